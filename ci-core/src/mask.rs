//! Masking secrets in output that arrives in pieces: every occurrence of
//! a value becomes `***`, also one split across two pieces. A piece's
//! last bytes that could begin a value are held back until the next
//! piece (or the end) says whether they do.

/// What a masked value is shown as.
pub const MASK: &[u8] = b"***";

/// Masks the values of some secrets in one stream of output.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Longest first, so that a value containing another is masked whole.
    values: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Masker {
    /// A masker of `values` (empty ones are ignored).
    pub fn new<V: AsRef<[u8]>>(values: impl IntoIterator<Item = V>) -> Masker {
        let mut values: Vec<Vec<u8>> = values
            .into_iter()
            .map(|v| v.as_ref().to_vec())
            .filter(|v| !v.is_empty())
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Masker {
            values,
            held: Vec::new(),
        }
    }

    /// True if there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The output of `piece` that is certain now, masked.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<u8> {
        if self.values.is_empty() {
            return piece.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(piece);
        let masked = self.replace(&buf);
        // Hold back the longest tail that is a proper start of a value.
        let hold = self
            .values
            .iter()
            .map(|v| {
                (1..v.len().min(masked.len() + 1))
                    .rev()
                    .find(|&k| masked.ends_with(&v[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let (out, held) = masked.split_at(masked.len() - hold);
        self.held = held.to_vec();
        out.to_vec()
    }

    /// What is held back: the end of the stream says it is no value.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// `text` with every value masked: for whole texts, such as an error
    /// message.
    pub fn mask_all(&self, text: &str) -> String {
        if self.values.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.replace(text.as_bytes())).into_owned()
    }

    fn replace(&self, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            for v in &self.values {
                if buf[i..].starts_with(v) {
                    out.extend_from_slice(MASK);
                    i += v.len();
                    continue 'scan;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: &[&str], pieces: &[&str]) -> String {
        let mut m = Masker::new(values);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(m.feed(p.as_bytes()));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_whole_and_split_values() {
        assert_eq!(run(&["hunter2"], &["pw=hunter2\n"]), "pw=***\n");
        assert_eq!(run(&["hunter2"], &["pw=hun", "ter2 ok"]), "pw=*** ok");
        assert_eq!(
            run(&["hunter2"], &["h", "u", "n", "t", "e", "r", "2", "!"]),
            "***!"
        );
        assert_eq!(
            run(&["hunter2"], &["hunt", "ing"]),
            "hunting",
            "a start that is no value"
        );
        assert_eq!(
            run(&["hunter2"], &["x hunt"]),
            "x hunt",
            "held back until the end"
        );
        assert_eq!(run(&["abc", "abcdef"], &["abcdefabc"]), "******");
        assert_eq!(run(&["aa"], &["aaa"]), "***a");
        assert_eq!(run(&[], &["plain"]), "plain");
        assert_eq!(Masker::new(["s3"]).mask_all("a s3 b s3"), "a *** b ***");
    }

    /// Nothing a value could begin with is sent before it is known not to
    /// be one: every prefix of the output is masked.
    #[test]
    fn no_part_of_a_value_is_let_out_early() {
        let secret = "correct-horse";
        let text = format!("one {secret} two {secret}");
        for cut in 0..text.len() {
            let mut m = Masker::new([secret]);
            let first = m.feed(&text.as_bytes()[..cut]);
            assert!(
                !String::from_utf8_lossy(&first).contains("correct-h"),
                "cut {cut}: {:?}",
                String::from_utf8_lossy(&first)
            );
            let mut all = first;
            all.extend(m.feed(&text.as_bytes()[cut..]));
            all.extend(m.finish());
            assert_eq!(String::from_utf8(all).unwrap(), "one *** two ***");
        }
    }
}
