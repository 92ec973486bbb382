//! Objects as files under a directory (the embedded default: no cloud account needed), with
//! the store's semantics kept: a conditional write checks its condition and writes under an
//! exclusive per-object lock, so exactly one of many racing creators wins, and a write is on
//! disk (file and directory fsynced) before it returns. Files are created 0600 and folders 0700
//! ([`private_files`]): conversations are personal data.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::private_files;

use super::{
    KeyPrefix, Listing, ObjectKey, ObjectStore, PROBE_PREFIX, StoreError, StoredObject,
    WriteCondition,
};

/// The local store's version of an object: a hash of its bytes.
fn content_version(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Objects as files under a directory (the embedded default: no cloud account needed).
pub struct LocalStore {
    /// Every key is a path below this directory.
    pub root: PathBuf,
}

impl LocalStore {
    /// The lock file of an object, outside the bucket's layout (`<root>/.locks/`).
    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join(".locks").join(format!(
            "{}.lock",
            hex::encode(Sha256::digest(key.as_bytes()))
        ))
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(StoreError::Permanent(format!(
                "refusing unsafe key {key:?}"
            )));
        }
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, key: &ObjectKey) -> Result<Option<StoredObject>, StoreError> {
        let read = tokio::fs::read(self.path(key.as_str())?).await;
        match read {
            Ok(bytes) => Ok(Some(StoredObject {
                version: content_version(&bytes),
                body: Bytes::from(bytes),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Transient(e.to_string())),
        }
    }

    async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        condition: &WriteCondition,
    ) -> Result<Option<String>, StoreError> {
        let path = self.path(key.as_str())?;
        let lock = self.lock_path(key.as_str());
        let condition = condition.clone();
        let version = content_version(&body);
        let written =
            tokio::task::spawn_blocking(move || write_durably(&path, &lock, &body, &condition))
                .await
                .map_err(|e| StoreError::Transient(format!("write task failed: {e}")))?;
        written.map(|()| Some(version))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path(key.as_str())?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::Transient(e.to_string())),
        }
        if key.as_str().starts_with(PROBE_PREFIX) {
            // A probe leaves nothing behind: its lock file, and its folders once empty (a
            // folder another probe still uses is not empty and stays).
            let _ = tokio::fs::remove_file(self.lock_path(key.as_str())).await;
            let mut folder = path.parent();
            while let Some(dir) = folder.filter(|dir| *dir != self.root.as_path()) {
                if tokio::fs::remove_dir(dir).await.is_err() {
                    break;
                }
                folder = dir.parent();
            }
        }
        Ok(())
    }

    /// The whole listing at once (a local directory has no request budget).
    async fn list(
        &self,
        prefix: &KeyPrefix,
        _continuation: Option<String>,
    ) -> Result<Listing, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.as_str().to_string();
        let keys = tokio::task::spawn_blocking(move || list_files(&root, &prefix))
            .await
            .map_err(|e| StoreError::Transient(format!("list task failed: {e}")))??;
        Ok(Listing {
            keys: keys.into_iter().map(ObjectKey::listed).collect(),
            next: None,
        })
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

/// The keys of the local store's files that start with `prefix`, sorted (lock files and
/// temporary files are not objects).
fn list_files(root: &Path, prefix: &str) -> Result<Vec<String>, StoreError> {
    // Walk from the deepest folder the prefix names completely.
    let folder = prefix.rsplit_once('/').map_or("", |(folder, _)| folder);
    if folder.split('/').any(|part| part == "." || part == "..") {
        return Err(StoreError::Permanent(format!(
            "refusing unsafe prefix {prefix:?}"
        )));
    }
    let mut keys = Vec::new();
    let mut pending = vec![(root.join(folder), folder.to_string())];
    while let Some((dir, key_dir)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::Transient(e.to_string())),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::Transient(e.to_string()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = if key_dir.is_empty() {
                name.clone()
            } else {
                format!("{key_dir}/{name}")
            };
            let file_type = entry
                .file_type()
                .map_err(|e| StoreError::Transient(e.to_string()))?;
            if file_type.is_dir() {
                if name != ".locks" {
                    pending.push((entry.path(), key));
                }
            } else if key.starts_with(prefix) && !name.ends_with(".tmp") {
                keys.push(key);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

/// Writes an object of the local store so that it is on disk when this returns, and only if
/// `condition` holds, atomically across processes: under an exclusive lock on the object's lock
/// file, it checks the condition, writes a temporary file, fsyncs it, renames it over the
/// object and fsyncs the directory (so the rename itself survives a power cut).
fn write_durably(
    path: &Path,
    lock: &Path,
    body: &[u8],
    condition: &WriteCondition,
) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Transient(e.to_string());
    for dir in [path.parent(), lock.parent()].into_iter().flatten() {
        private_files::create_dir_all(dir).map_err(io)?;
    }
    let lock_file = private_files::open_for_writing(lock).map_err(io)?;
    // Released when the file is closed, also if this process dies.
    lock_file.lock().map_err(io)?;
    let current = match std::fs::read(path) {
        Ok(bytes) => Some(content_version(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let holds = match condition {
        WriteCondition::Absent => current.is_none(),
        WriteCondition::Matches(version) => current.as_deref() == Some(version.as_str()),
    };
    if !holds {
        return Err(StoreError::Conflict);
    }
    // Write aside, then rename: readers never see half a file.
    let temp = path.with_extension(format!("json.{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut file = private_files::create(&temp).map_err(io)?;
    file.write_all(body).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
