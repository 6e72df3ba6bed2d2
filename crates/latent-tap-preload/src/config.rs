//! Settings of the tap, read once from the host's environment.

use crate::error::{Error, Result};
use crate::record::Dtype;
use crate::select::{glob_match, layer_of, LayerFilter};

/// Default sink when `LATENT_TAP_SINK` is unset.
pub const DEFAULT_SINK: &str = "/tmp/latent-tap.sock";
/// Default ring size in MiB (`LATENT_TAP_RING_MB`).
pub const DEFAULT_RING_MB: usize = 64;
/// Largest ring accepted (MiB).
pub const MAX_RING_MB: usize = 64 * 1024;

/// What the tap captures and where it sends it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Glob patterns over ggml node names.
    pub patterns: Vec<String>,
    /// The patterns as given.
    pub tensors: String,
    /// Layer filter (`None`: all layers).
    pub layers: Option<LayerFilter>,
    /// The layer filter as given (`all` when unset).
    pub layers_text: String,
    /// Only rows llama.cpp computed logits for.
    pub last_only: bool,
    /// Payload element type.
    pub dtype: Dtype,
    /// Unix socket path of the listener.
    pub sink: String,
    /// Ring bytes.
    pub ring_bytes: usize,
    /// Write log lines to stderr.
    pub log: bool,
    /// Users besides the host's own whose listener (and socket file) the tap
    /// may send to (`LATENT_TAP_ALLOW_UID`, comma-separated).
    pub allow_uids: Vec<u32>,
}

impl Config {
    /// From the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From any key lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let tensors = get("LATENT_TAP_TENSORS").unwrap_or_else(|| "l_out-*".into());
        let patterns: Vec<String> = tensors
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if patterns.is_empty() {
            return Err(Error::invalid("LATENT_TAP_TENSORS names no pattern"));
        }
        let layers_text = get("LATENT_TAP_LAYERS").unwrap_or_else(|| "all".into());
        let layers =
            match layers_text.trim() {
                "" | "all" => None,
                s => Some(LayerFilter::parse(s).map_err(|e| {
                    Error::invalid(format!("LATENT_TAP_LAYERS={s}: {}", e.message()))
                })?),
            };
        let last_only = match get("LATENT_TAP_ROWS").as_deref().map(str::trim) {
            None | Some("") | Some("all") => false,
            Some("last") => true,
            Some(o) => {
                return Err(Error::invalid(format!(
                    "LATENT_TAP_ROWS={o}: use all or last"
                )))
            }
        };
        let dtype = match get("LATENT_TAP_DTYPE") {
            None => Dtype::F32,
            Some(s) => Dtype::parse(s.trim())
                .map_err(|e| Error::invalid(format!("LATENT_TAP_DTYPE: {}", e.message())))?,
        };
        let sink = get("LATENT_TAP_SINK")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SINK.into());
        if sink.len() >= 108 {
            return Err(Error::invalid(format!(
                "LATENT_TAP_SINK={sink}: a Unix socket path must be shorter than 108 bytes"
            )));
        }
        let ring_mb = match get("LATENT_TAP_RING_MB") {
            None => DEFAULT_RING_MB,
            Some(s) => s
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&m| (1..=MAX_RING_MB).contains(&m))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "LATENT_TAP_RING_MB={s}: use a whole number of MiB from 1 to {MAX_RING_MB}"
                    ))
                })?,
        };
        let log = get("LATENT_TAP_LOG").is_none_or(|v| v.trim() != "0");
        let allow_uids = match get("LATENT_TAP_ALLOW_UID") {
            None => Vec::new(),
            Some(s) => s
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(|u| u.parse::<u32>())
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|_| {
                    Error::invalid(format!(
                        "LATENT_TAP_ALLOW_UID={s}: use user ids (numbers), comma-separated"
                    ))
                })?,
        };
        Ok(Self {
            patterns,
            tensors,
            layers,
            layers_text,
            last_only,
            dtype,
            sink,
            ring_bytes: ring_mb << 20,
            log,
            allow_uids,
        })
    }

    /// Index of the first pattern that selects the node `name`, if any.
    pub fn select(&self, name: &[u8]) -> Option<u32> {
        let name = std::str::from_utf8(name).ok()?;
        let i = self.patterns.iter().position(|p| glob_match(p, name))?;
        if let Some(f) = &self.layers {
            if !layer_of(name).is_some_and(|l| f.contains(l)) {
                return None;
            }
        }
        Some(i as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        Config::from_lookup(|k| {
            pairs
                .iter()
                .find(|(kk, _)| *kk == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_select_every_residual_stream() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.select(b"l_out-0"), Some(0));
        assert_eq!(c.select(b"l_out-17"), Some(0));
        assert_eq!(c.select(b"attn_out-3"), None);
        assert_eq!(
            (c.sink.as_str(), c.ring_bytes, c.last_only),
            (DEFAULT_SINK, 64 << 20, false)
        );
        assert_eq!(c.dtype, Dtype::F32);
    }

    #[test]
    fn layers_and_patterns_combine() {
        let c = cfg(&[
            ("LATENT_TAP_TENSORS", "attn_out-*, l_out-*"),
            ("LATENT_TAP_LAYERS", "0,5..=6"),
            ("LATENT_TAP_ROWS", "last"),
            ("LATENT_TAP_DTYPE", "bf16"),
        ])
        .unwrap();
        assert_eq!(c.select(b"attn_out-5"), Some(0));
        assert_eq!(c.select(b"l_out-6"), Some(1));
        assert_eq!(c.select(b"l_out-7"), None);
        assert!(c.last_only);
        assert_eq!(c.dtype, Dtype::BF16);
        assert!(c.allow_uids.is_empty());
        let c = cfg(&[("LATENT_TAP_ALLOW_UID", "0, 1000")]).unwrap();
        assert_eq!(c.allow_uids, [0, 1000]);
    }

    #[test]
    fn bad_settings_are_refused_with_the_variable_named() {
        for (k, v) in [
            ("LATENT_TAP_ROWS", "some"),
            ("LATENT_TAP_DTYPE", "f64"),
            ("LATENT_TAP_RING_MB", "0"),
            ("LATENT_TAP_RING_MB", "lots"),
            ("LATENT_TAP_TENSORS", " , "),
            ("LATENT_TAP_LAYERS", "x-"),
            ("LATENT_TAP_ALLOW_UID", "root"),
        ] {
            let e = cfg(&[(k, v)]).unwrap_err();
            assert!(e.message().contains(k), "{k}={v}: {}", e.message());
        }
        let long = "/tmp/".to_string() + &"x".repeat(120);
        assert!(cfg(&[("LATENT_TAP_SINK", &long)]).is_err());
    }
}
