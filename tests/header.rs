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
