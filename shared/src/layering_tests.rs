//! The domain's cut, held by a test: the pure domain (ids, the event model and its identity,
//! the job codec) imports no adapter (database, broker, object store, HTTP clients), so it
//! could become a crate of its own by moving files (see docs/ARCHITECTURE.md, "The domain's
//! cut").

use std::path::Path;

/// The domain: files and folders under `shared/src/`.
const DOMAIN: &[&str] = &["ids.rs", "jobs.rs", "facebook/event"];

/// What the domain must not name: the adapters inside this crate and the crates they wrap.
const ADAPTERS: &[&str] = &[
    "crate::storage",
    "crate::queue",
    "crate::facebook::graph",
    "crate::facebook::login",
    "crate::facebook::conversations",
    "crate::crypto",
    "sqlx",
    "lapin",
    "aws_sdk_s3",
    "reqwest",
    "axum",
    "tokio",
];

fn rust_files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read the source folder") {
            rust_files(&entry.expect("entry").path(), out);
        }
    } else if path.extension().is_some_and(|ext| ext == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn the_domain_imports_no_adapter() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for part in DOMAIN {
        rust_files(&src.join(part), &mut files);
    }
    assert!(files.len() >= 5, "the domain's files are found: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for adapter in ADAPTERS {
                let named = code.contains(&format!("{adapter}::"))
                    || code.contains(&format!("use {adapter};"))
                    || code.contains(&format!("{adapter} {{"));
                if named {
                    found.push(format!("{}:{}: {line}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the domain names an adapter:\n{}",
        found.join("\n")
    );
}
