//! `include/latent_tap.h` must be exactly what the pinned cbindgen generates
//! from the source. Regenerate with `LT_BLESS=1 cargo test --release --test header`.

use std::path::PathBuf;

#[test]
fn committed_header_is_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let path = root.join("include/latent_tap.h");
    if std::env::var_os("LT_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/latent_tap.h is stale: run `LT_BLESS=1 cargo test --release --test header` and commit it"
    );
}

/// The header's comments are written for C readers: no Rust syntax leaks in
/// from the doc comments cbindgen copies.
#[test]
fn header_docs_are_c_not_rust() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/latent_tap.h")).unwrap();
    let rustisms = [
        "[`", "::<", "Option<", "&[", "Vec<", "Self", "size_of", "u32", "u64", "i32", "usize", "::",
    ];
    let found: Vec<String> = header
        .lines()
        .enumerate()
        .filter(|(_, l)| rustisms.iter().any(|r| l.contains(r)))
        .map(|(i, l)| format!("{}: {}", i + 1, l.trim()))
        .collect();
    assert!(
        found.is_empty(),
        "Rust in the C header:\n{}",
        found.join("\n")
    );
    // Only the API's own names: a `pub const` elsewhere in the crate must not leak in.
    let leaked: Vec<&str> = header
        .lines()
        .filter(|l| l.starts_with("#define") && !l.starts_with("#define LT_"))
        .filter(|l| !l.starts_with("#define LATENT_TAP_H"))
        .collect();
    assert!(leaked.is_empty(), "non-API constants: {leaked:?}");
}
