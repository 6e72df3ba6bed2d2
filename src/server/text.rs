//! Turning sampled token pieces into text the way llama-server does: bytes
//! are held until they form complete UTF-8, stop strings cut the text before
//! them, and a streaming client never sees a prefix of a stop string that may
//! still complete.

/// Incremental text with stop-string handling.
#[derive(Debug, Default)]
pub struct TextState {
    pending: Vec<u8>,
    full: String,
    sent: usize,
    stop: Vec<String>,
    /// The stop string found, once found.
    pub stopped: Option<String>,
}

impl TextState {
    /// Watch for `stop` strings.
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            ..Self::default()
        }
    }

    /// Add a token's bytes; returns the text that may now be shown (may be empty).
    pub fn push(&mut self, piece: &[u8]) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        self.pending.extend_from_slice(piece);
        // Replace each invalid sequence as it is found; keep an incomplete tail for later.
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    self.full.push_str(text);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    let Some(bad) = e.error_len() else {
                        let text = std::str::from_utf8(&self.pending[..good]).unwrap_or_default();
                        self.full.push_str(text);
                        self.pending.drain(..good);
                        break;
                    };
                    let text = String::from_utf8_lossy(&self.pending[..good + bad]).into_owned();
                    self.full.push_str(&text);
                    self.pending.drain(..good + bad);
                }
            }
        }
        self.release()
    }

    /// Everything left when generation ends (incomplete bytes are shown replaced).
    pub fn finish(&mut self) -> String {
        if self.stopped.is_none() && !self.pending.is_empty() {
            let s = String::from_utf8_lossy(&self.pending).into_owned();
            self.pending.clear();
            self.full.push_str(&s);
            self.check_stop();
        }
        let out = self.full[self.sent.min(self.full.len())..].to_string();
        self.sent = self.full.len();
        out
    }

    /// The text shown so far plus what [`TextState::finish`] would add.
    pub fn content(&self) -> &str {
        &self.full
    }

    fn check_stop(&mut self) {
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.full.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, s)) = hit {
            self.stopped = Some(s.clone());
            self.full.truncate(i);
        }
    }

    fn release(&mut self) -> String {
        self.check_stop();
        let mut end = self.full.len();
        if self.stopped.is_none() {
            // Hold back a suffix that could still grow into a stop string.
            let held = self
                .stop
                .iter()
                .map(|s| partial_suffix(&self.full, s))
                .max()
                .unwrap_or(0);
            end -= held;
        }
        let start = self.sent.min(end);
        let out = self.full[start..end].to_string();
        self.sent = end.max(self.sent);
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`
/// (on a char boundary).
fn partial_suffix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens_is_held() {
        let mut t = TextState::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(t.push(&e[..1]), "");
        assert_eq!(t.push(&e[1..]), "é");
        assert_eq!(t.finish(), "");
        assert_eq!(t.content(), "é");
    }

    #[test]
    fn invalid_bytes_are_replaced_one_by_one() {
        let mut t = TextState::new(vec![]);
        // An invalid byte, then a lead byte whose continuation comes next token.
        assert_eq!(t.push(&[0xff, 0xc2]), "\u{fffd}");
        assert_eq!(t.push(&[0xac]), "¬");
        assert_eq!(t.content(), "\u{fffd}¬");
    }

    #[test]
    fn stop_string_cuts_and_holds_back() {
        let mut t = TextState::new(vec!["END".into()]);
        assert_eq!(t.push(b"abc E"), "abc ");
        assert_eq!(t.push(b"N"), "");
        assert_eq!(t.push(b"Dxyz"), "");
        assert_eq!(t.stopped.as_deref(), Some("END"));
        assert_eq!(t.content(), "abc ");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn false_alarm_is_released() {
        let mut t = TextState::new(vec!["END".into()]);
        assert_eq!(t.push(b"E"), "");
        assert_eq!(t.push(b"x"), "Ex");
        assert!(t.stopped.is_none());
    }
}
