//! Model files llama.cpp would abort on, or report vaguely, are refused with
//! one clear line before llama.cpp sees them (`gguf` pre-check), and the
//! `synth-model` subcommand cannot write such a file.

use std::path::{Path, PathBuf};
use std::process::Command;

use latent_tap::engine::{Model, ModelOptions};
use latent_tap::synth::{SynthConfig, SynthModel};
use latent_tap::ErrorKind;

fn synth_bytes(dir: &Path) -> Vec<u8> {
    let p = dir.join("good.gguf");
    SynthModel::random(SynthConfig::default())
        .write_gguf(&p)
        .unwrap();
    std::fs::read(p).unwrap()
}

/// Overwrite the 4-byte value of metadata `key` (a u32 or f32) in a synthetic file.
fn patch(bytes: &mut [u8], key: &str, value: [u8; 4]) {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{key} not in the file"));
    let v = at + needle.len() + 4;
    bytes[v..v + 4].copy_from_slice(&value);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn load_err(path: &Path) -> String {
    match Model::load(path, &ModelOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::ModelLoad, "{e}");
            let m = e.to_string();
            assert!(!m.contains('\n'), "one line: {m}");
            assert!(
                m.contains(&path.display().to_string()),
                "names the file: {m}"
            );
            assert!(
                !m.contains("--"),
                "a library message names no CLI flag: {m}"
            );
            m
        }
    }
}

#[test]
fn hparams_llama_cpp_aborts_on_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth_bytes(dir.path());
    // Each of these made llama.cpp abort the process (GGML_ASSERT) at load or decode.
    for (i, (key, value)) in [
        ("llama.block_count", 0u32.to_le_bytes()),
        ("llama.block_count", 513u32.to_le_bytes()),
        (
            "llama.attention.layer_norm_rms_epsilon",
            f32::NAN.to_le_bytes(),
        ),
        ("llama.attention.head_count_kv", 3u32.to_le_bytes()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = good.clone();
        patch(&mut b, key, value);
        let p = write(dir.path(), &format!("bad{i}.gguf"), &b);
        let m = load_err(&p);
        assert!(m.contains(key), "names the key: {m}");
    }
    // The unpatched file loads.
    let p = write(dir.path(), "ok.gguf", &good);
    let m = Model::load(&p, &ModelOptions::default()).unwrap();
    assert_eq!((m.n_layer(), m.n_embd()), (3, 64));
}

#[test]
fn directories_and_corrupt_files_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let m = load_err(dir.path());
    assert!(m.contains("is a directory"), "{m}");
    // A well-formed GGUF that llama.cpp still refuses (a required tensor is
    // missing): its reason is quoted, with a pointer to the full log.
    let mut b = synth_bytes(dir.path());
    let at = b
        .windows(18)
        .position(|w| w == b"output_norm.weight")
        .unwrap();
    b[at..at + 18].copy_from_slice(b"output_nxrm.weight");
    let p = write(dir.path(), "corrupt.gguf", &b);
    let m = load_err(&p);
    assert!(m.contains("output_norm.weight"), "llama.cpp's reason: {m}");
    assert!(m.contains("LATENT_TAP_LOG=1"), "{m}");
}

#[test]
fn synth_model_refuses_what_llama_cpp_cannot_load() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = dir.path().join("s.gguf");
        let o = Command::new(env!("CARGO_BIN_EXE_latent-tap"))
            .arg("synth-model")
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        (o, out)
    };
    for (args, needle) in [
        (&["--layers", "513"][..], "n_layer is 513"),
        (&["--embd", "800000"][..], "n_embd is 800000"),
        (&["--layers", "512", "--embd", "4096"][..], "MiB of weights"),
    ] {
        let t0 = std::time::Instant::now();
        let (o, out) = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote a file");
        assert!(t0.elapsed().as_secs() < 10, "{args:?} refused at once");
    }
    let (o, out) = run(&["--layers", "5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Model::load(&out, &ModelOptions::default()).unwrap();
    assert_eq!(m.n_layer(), 5);
}
