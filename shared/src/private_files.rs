//! Files and folders only their owner can read: conversations are personal data, and the
//! database holds them staged (and the sealed tokens). Files are created 0600 and folders
//! 0700 whatever the umask, so another local user cannot read them.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of every file fbsync creates.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every folder fbsync creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents, each 0700 (folders that exist are left as they are).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for writing, creating it 0600 if it is missing (an existing file keeps its
/// mode and its bytes).
pub fn open_for_writing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates `path` 0600, truncating it if it exists.
pub fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(FILE_MODE)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_and_folders_are_the_owners_alone_whatever_the_umask() {
        let root = std::env::temp_dir().join(format!("fbsync-private-{}", uuid::Uuid::new_v4()));
        let dir = root.join("a/b");
        create_dir_all(&dir).expect("folders");
        create(&dir.join("x.json")).expect("file");
        open_for_writing(&dir.join("y.lock")).expect("file");
        let mode = |path: &Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&root.join("a")), DIR_MODE);
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("x.json")), FILE_MODE);
        assert_eq!(mode(&dir.join("y.lock")), FILE_MODE);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
