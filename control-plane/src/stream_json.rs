//! The CLI's stream-json output lines, read without copying their text.
//!
//! A reply's text is in its lines several times over (the deltas, the
//! assistant message, the result), and a tool's output can be megabytes.
//! So a line is parsed only as far as the service needs: its `type` and the
//! fields frames and responses read, each as a slice of the line
//! ([`RawValue`]). The text stays in the line ([`Text`]), and frames, the
//! history and the sync response take their parts from it.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;
use shared::Text;

/// The fields of a CLI message the service reads, as slices of its line.
/// Keys it does not read are skipped, not copied.
#[derive(Debug, Default, Deserialize)]
pub struct CliMessage<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    /// `stream_event`: the model's event.
    #[serde(borrow, default)]
    pub event: Option<&'a RawValue>,
    /// `assistant`, `user`: the message.
    #[serde(borrow, default)]
    pub message: Option<&'a RawValue>,
    /// `result`: the final text (or the error).
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub subtype: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub is_error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub total_cost_usd: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub duration_ms: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub num_turns: Option<&'a RawValue>,
}

/// A line of the CLI's output that is JSON, and its `type`.
#[derive(Debug, Clone)]
pub struct CliLine {
    /// `None` for JSON that is no object with a string `type`.
    pub kind: Option<String>,
    /// Compact JSON without a CR (see [`CliLine::read`]).
    pub line: Text,
}

impl CliLine {
    /// Reads one output line; an error when it is not JSON. A line SSE
    /// cannot carry as it is (a CR, which JSON allows as whitespace) or
    /// that the typed view cannot read (a duplicate key) is written anew
    /// from its parsed value, as the last duplicate wins there.
    pub fn read(line: Text) -> Result<CliLine, serde_json::Error> {
        let line = if line.contains('\r') { rewritten(&line)? } else { line };
        match serde_json::from_str::<CliMessage>(&line) {
            Ok(message) => {
                let kind = message.kind.map(Cow::into_owned);
                Ok(CliLine { kind, line })
            }
            Err(_) => {
                let value: Value = serde_json::from_str(&line)?;
                let line: Text = value.to_string().into();
                let kind = serde_json::from_str::<CliMessage>(&line).ok().and_then(|m| m.kind.map(Cow::into_owned));
                Ok(CliLine { kind, line })
            }
        }
    }

    /// The fields the service reads (empty for a line that is no object).
    pub fn message(&self) -> CliMessage<'_> {
        serde_json::from_str(&self.line).unwrap_or_default()
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

fn rewritten(line: &str) -> Result<Text, serde_json::Error> {
    Ok(serde_json::from_str::<Value>(line)?.to_string().into())
}

/// A JSON string's text: `Some` when `raw` is a JSON string.
pub fn string(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    raw.filter(|raw| raw.get().starts_with('"')).and_then(|raw| serde_json::from_str(raw.get()).ok())
}

/// `raw` when it is a JSON string literal (quotes and escapes included).
pub fn string_literal(raw: Option<&RawValue>) -> Option<&str> {
    raw.map(RawValue::get).filter(|json| json.starts_with('"'))
}

/// A part of a message read into `T`; `None` when it does not have that
/// shape (as an absent key reads in a `Value`).
pub fn view<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    serde_json::from_str(raw?.get()).ok()
}

/// `stream_event`'s event, as far as frames read it.
#[derive(Debug, Deserialize)]
pub struct StreamEvent<'a> {
    #[serde(borrow, default)]
    pub delta: Option<Delta<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct Delta<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub thinking: Option<&'a RawValue>,
}

/// An `assistant` or `user` message's content blocks.
#[derive(Debug, Deserialize)]
pub struct MessageBody<'a> {
    #[serde(borrow, default)]
    pub content: Option<&'a RawValue>,
}

impl<'a> MessageBody<'a> {
    /// The content's blocks; none when the content is no array (a user
    /// message's plain text).
    pub fn blocks(raw: Option<&'a RawValue>) -> Vec<Block<'a>> {
        view::<MessageBody>(raw).and_then(|body| view::<Vec<Block>>(body.content)).unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
pub struct Block<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    /// `tool_use`
    #[serde(borrow, default)]
    pub name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub input: Option<&'a RawValue>,
    /// `tool_result`
    #[serde(borrow, default)]
    pub content: Option<&'a RawValue>,
}

impl Block<'_> {
    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

/// JSON text (a CLI line) written into a response as it is.
#[derive(Debug, Clone)]
pub struct RawJson(pub Text);

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_read_without_its_text_and_odd_lines_are_written_anew() {
        let line = CliLine::read(Text::from(
            r#"{"type":"result","result":"a \"big\" text","is_error":false,"usage":{"input_tokens":3},"x":[1]}"#,
        ))
        .expect("json");
        assert!(line.is("result"));
        let message = line.message();
        assert_eq!(string_literal(message.result), Some(r#""a \"big\" text""#));
        assert_eq!(string(message.result).as_deref(), Some(r#"a "big" text"#));
        assert!(line.line.part(message.result.expect("result").get()).is_some(), "the text was copied");
        assert_eq!(message.usage.map(RawValue::get), Some(r#"{"input_tokens":3}"#));
        // A CR between tokens (SSE cannot carry it) and a duplicate key.
        let line = CliLine::read(Text::from("{\"type\":\"user\",\r\n\"a\":1}")).expect("json");
        assert_eq!(line.line, r#"{"a":1,"type":"user"}"#);
        let line = CliLine::read(Text::from(r#"{"type":"user","type":"assistant"}"#)).expect("json");
        assert!(line.is("assistant"), "{line:?}");
        // JSON that is no message is read, with no type; not JSON is an error.
        for other in ["[1,2]", "\"text\"", r#"{"type":7}"#, "{}"] {
            assert_eq!(CliLine::read(Text::from(other)).expect(other).kind, None, "{other}");
        }
        assert!(CliLine::read(Text::from("{\"type\":")).is_err());
    }

    #[test]
    fn blocks_of_a_message_and_raw_json_in_a_response() {
        let line = CliLine::read(Text::from(
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"},{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}"#,
        ))
        .expect("json");
        let blocks = MessageBody::blocks(line.message().message);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].is("tool_use"));
        assert_eq!(string(blocks[1].name).as_deref(), Some("Bash"));
        assert_eq!(blocks[1].input.map(RawValue::get), Some(r#"{"command":"ls"}"#));
        // Plain text content has no blocks.
        let user = CliLine::read(Text::from(r#"{"type":"user","message":{"content":"hello"}}"#)).expect("json");
        assert!(MessageBody::blocks(user.message().message).is_empty());
        let response = serde_json::to_string(&serde_json::json!({"m": [RawJson(line.line.clone())]})).expect("json");
        assert!(response.contains(r#"{"command":"ls"}"#), "{response}");
    }
}
