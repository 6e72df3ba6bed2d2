//! What a lens request asks for (layers, top-k, rows, target) and its checks;
//! the `lens` request field of `serve` is parsed here, so every front end
//! gives the same messages.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::select::LayerFilter;
use crate::settings;

/// Which layers the lens reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LayerSpec {
    /// Every layer (of the model, or that has a row).
    #[default]
    All,
    /// The layers a filter names (`3,5,8`, `0..18`, `4..=12`), all of which must exist.
    Filter(LayerFilter),
}

impl LayerSpec {
    /// `all`, or a layer filter in the syntax of `latents`' `layers` (`a..b`
    /// half-open, `a..=b`, `n`, comma lists).
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim() == "all" {
            return Ok(Self::All);
        }
        LayerFilter::parse(s).map(Self::Filter)
    }

    /// The layers of a model with `n_layer` layers this spec names, increasing;
    /// a named layer the model does not have is an error naming it.
    pub fn resolve(&self, n_layer: usize) -> Result<Vec<usize>> {
        match self {
            Self::All => Ok((0..n_layer).collect()),
            Self::Filter(f) => {
                let (lo, hi) = f.bounds();
                if lo < 0 || hi >= n_layer as i32 {
                    let bad = if lo < 0 { lo } else { hi };
                    return Err(Error::invalid(format!(
                        "lens layer {bad} does not exist: the model has layers 0..={}",
                        n_layer.saturating_sub(1)
                    )));
                }
                Ok((0..n_layer).filter(|&l| f.contains(l as i32)).collect())
            }
        }
    }
}

/// Which rows get a lens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LensRows {
    /// Every row the graph computes.
    #[default]
    All,
    /// Only rows whose next-token distribution the model computes (as `latents`' `rows: last`).
    Last,
}

/// What each row is scored against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The token that came next (the next prompt token, or the token sampled from the row).
    #[default]
    Next,
    /// One fixed token id for every row.
    Token(i32),
}

/// A lens request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LensOptions {
    /// Layers read.
    pub layers: LayerSpec,
    /// Alternatives per cell, `1..=settings::MAX_LENS_TOP_K`.
    pub top_k: usize,
    /// Rows read.
    pub rows: LensRows,
    /// Target of the target log-probability and rank.
    pub target: Target,
}

impl Default for LensOptions {
    fn default() -> Self {
        Self {
            layers: LayerSpec::All,
            top_k: settings::DEFAULT_LENS_TOP_K,
            rows: LensRows::All,
            target: Target::Next,
        }
    }
}

impl LensOptions {
    /// Check the bounds.
    pub fn validate(&self) -> Result<()> {
        settings::check_lens_top_k(self.top_k)
    }

    /// The `lens` request field: absent, `null` or `false` → `None`; `true` →
    /// the defaults; an object `{"layers", "top_k", "rows"}`. Errors name the field.
    pub fn from_json(v: Option<&Value>) -> Result<Option<Self>> {
        let o = match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => return Ok(Some(Self::default())),
            Some(Value::Object(o)) => o,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "'lens' must be true, false or an object like {{\"layers\": \"all\", \"top_k\": 5, \"rows\": \"all\"}}, not {other}"
                )))
            }
        };
        let mut out = Self::default();
        for (k, v) in o {
            match (k.as_str(), v) {
                (_, Value::Null) => {}
                ("layers", Value::String(s)) => {
                    out.layers = LayerSpec::parse(s)
                        .map_err(|e| Error::invalid(format!("lens 'layers': {}", e.message())))?;
                }
                ("layers", Value::Array(a)) => {
                    let ids: Option<Vec<String>> = a
                        .iter()
                        .map(|x| x.as_u64().map(|n| n.to_string()))
                        .collect();
                    let ids = ids.filter(|i| !i.is_empty()).ok_or_else(|| {
                        Error::invalid(format!(
                            "lens 'layers' must list layer numbers (>= 0), not {v}"
                        ))
                    })?;
                    out.layers = LayerSpec::parse(&ids.join(","))?;
                }
                ("layers", _) => {
                    return Err(Error::invalid(format!(
                        "lens 'layers' must be \"all\", a filter like \"3,5,8\" or \"0..18\", or an array of layer numbers, not {v}"
                    )))
                }
                ("top_k", _) => {
                    let k = v.as_u64().ok_or_else(|| {
                        Error::invalid(format!(
                            "lens 'top_k' must be an integer 1..={}, not {v}",
                            settings::MAX_LENS_TOP_K
                        ))
                    })?;
                    out.top_k = usize::try_from(k).unwrap_or(usize::MAX);
                    settings::check_lens_top_k(out.top_k)?;
                }
                ("rows", Value::String(s)) if s == "all" => out.rows = LensRows::All,
                ("rows", Value::String(s)) if s == "last" => out.rows = LensRows::Last,
                ("rows", _) => {
                    return Err(Error::invalid(format!(
                        "lens 'rows' must be \"all\" or \"last\", not {v}"
                    )))
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "lens has no field '{k}' (fields: layers, top_k, rows)"
                    )))
                }
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Option<LensOptions>> {
        LensOptions::from_json(Some(&v))
    }

    #[test]
    fn request_field_forms() {
        assert_eq!(parse(json!(false)).unwrap(), None);
        assert_eq!(LensOptions::from_json(None).unwrap(), None);
        assert_eq!(parse(json!(true)).unwrap(), Some(LensOptions::default()));
        let o = parse(json!({"layers": [3, 5], "top_k": 20, "rows": "last"}))
            .unwrap()
            .unwrap();
        assert_eq!(o.layers.resolve(18).unwrap(), vec![3, 5]);
        assert_eq!((o.top_k, o.rows), (20, LensRows::Last));
        let o = parse(json!({"layers": "0..3"})).unwrap().unwrap();
        assert_eq!(o.layers.resolve(18).unwrap(), vec![0, 1, 2]);
        assert_eq!(
            LayerSpec::parse("all").unwrap().resolve(3).unwrap(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let msg = |v: Value| parse(v).unwrap_err().message().to_string();
        assert!(msg(json!({"top_k": 0})).contains("lens top_k 0 is out of range 1..=20"));
        assert!(msg(json!({"top_k": 21})).contains("out of range 1..=20"));
        assert!(msg(json!({"top_k": "5"})).contains("lens 'top_k'"));
        assert!(msg(json!({"rows": "some"})).contains("lens 'rows'"));
        assert!(msg(json!({"layers": "x"})).contains("lens 'layers'"));
        assert!(msg(json!({"layers": [-1]})).contains("lens 'layers'"));
        assert!(msg(json!({"colour": 1})).contains("no field 'colour'"));
        assert!(msg(json!(3)).contains("'lens' must be"));
        let e = LayerSpec::parse("3,40").unwrap().resolve(18).unwrap_err();
        assert!(e.message().contains("lens layer 40 does not exist"), "{e}");
    }
}
