//! The webhook payloads of `tests/fixtures/messenger/` (see `tests/fixtures/README.md`), read
//! byte for byte: signatures are computed over the exact bytes.

use std::path::PathBuf;

/// The folder of the messenger fixtures, inside the repository.
fn messenger_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messenger")
}

/// A fixture from `tests/fixtures/messenger`, byte for byte.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = messenger_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The names of every messenger fixture, sorted.
pub fn fixture_names() -> Vec<String> {
    let dir = messenger_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    names
}
