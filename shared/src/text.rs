//! [`Text`]: UTF-8 in a shared, reference-counted buffer.
//!
//! A CLI's output line travels from the worker's socket to every reader of
//! its session (the turn, the SSE frames, the store) as one `Text`: cloning
//! it or taking a part of it copies nothing. A 100 MB reply line copied
//! once per reader, and into fresh allocations each time, was most of the
//! relay's cost.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// UTF-8 text in a shared buffer (see the module docs).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(Bytes);

impl Text {
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes a `String`/`&'static str` or
        // checks the bytes (`TryFrom<Bytes>`), and parts are cut at
        // positions of a `&str` inside this one (`part`).
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The buffer, e.g. to write it to a socket without a copy.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// `part`, which must be a slice of this text (e.g. a value a parser
    /// borrowed from it), as a `Text` sharing this buffer; `None` when it
    /// is not a slice of it.
    pub fn part(&self, part: &str) -> Option<Text> {
        let whole = self.0.as_ptr_range();
        let range = part.as_bytes().as_ptr_range();
        (whole.start <= range.start && range.end <= whole.end).then(|| Text(self.0.slice_ref(part.as_bytes())))
    }

    /// The pieces one after the other, in one buffer (no copy for one piece).
    pub fn concat(pieces: &[Text]) -> Text {
        match pieces {
            [] => Text::default(),
            [one] => one.clone(),
            many => {
                let mut joined = String::with_capacity(many.iter().map(|p| p.len()).sum());
                for piece in many {
                    joined.push_str(piece);
                }
                joined.into()
            }
        }
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text(Bytes::from(text.into_bytes()))
    }
}

impl From<&'static str> for Text {
    fn from(text: &'static str) -> Self {
        Text(Bytes::from_static(text.as_bytes()))
    }
}

impl TryFrom<Bytes> for Text {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Text::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_share_the_buffer_and_only_slices_are_parts() {
        let text = Text::from(String::from("{\"text\":\"héllo\"}"));
        let inner = &text[9..15];
        let part = text.part(inner).expect("a slice of it");
        assert_eq!(part, "héllo");
        assert_eq!(part.as_bytes().as_ptr(), inner.as_ptr(), "copied instead of shared");
        assert!(text.part("héllo").is_none(), "a string elsewhere is no part of it");
        assert_eq!(text.part(&text[..0]).as_deref(), Some(""));
    }

    #[test]
    fn only_utf8_bytes_become_text_and_pieces_join() {
        assert!(Text::try_from(Bytes::from_static(b"\xff")).is_err());
        let pieces = [Text::from("ab"), Text::from(String::from("c")), Text::from("é")];
        assert_eq!(Text::concat(&pieces), "abcé");
        assert_eq!(Text::concat(&pieces[..1]).as_bytes().as_ptr(), pieces[0].as_bytes().as_ptr());
        assert_eq!(Text::concat(&[]), "");
        let json = serde_json::to_string(&pieces[2]).expect("json");
        assert_eq!(serde_json::from_str::<Text>(&json).expect("parse"), "é");
    }
}
