//! What a model response cost: usage and tool calls read from the bytes as
//! they pass through (streamed SSE or a whole JSON body), and the price
//! table that turns tokens into dollars.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::config::ModelPrice;
use crate::store::UsageTotals;

/// Longest tool input kept in the audit log, in characters.
const TOOL_INPUT_PREVIEW: usize = 1000;
/// Largest non-streamed body read for its usage (the bytes pass through
/// regardless).
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;

/// One tool call seen in a response.
#[derive(Debug, Default, Clone)]
struct ToolCall {
    name: String,
    input_bytes: usize,
    preview: String,
}

/// Reads usage and tool calls from a response body, chunk by chunk, without
/// holding the chunks back.
#[derive(Debug, Default)]
pub struct ResponseMeter {
    streaming: bool,
    /// Bytes of an incomplete SSE line, or of a JSON body.
    pending: Vec<u8>,
    pub model: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_tokens: i64,
    cache_creation_tokens: i64,
    /// By content block index.
    tools: BTreeMap<u64, ToolCall>,
}

impl ResponseMeter {
    pub fn new(streaming: bool) -> Self {
        Self { streaming, ..Self::default() }
    }

    /// Sees the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.streaming {
            if self.pending.len() + chunk.len() <= MAX_JSON_BODY {
                self.pending.extend_from_slice(chunk);
            }
            return;
        }
        self.pending.extend_from_slice(chunk);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if let Some(data) = line.strip_prefix(b"data:")
                && let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii())
            {
                self.event(&event);
            }
        }
    }

    /// The body is complete: reads a JSON body (non-streamed responses).
    pub fn finish(&mut self) {
        if !self.streaming
            && let Ok(body) = serde_json::from_slice::<Value>(&self.pending)
        {
            self.model = body["model"].as_str().map(str::to_owned).or(self.model.take());
            self.usage(&body["usage"]);
            for (index, block) in body["content"].as_array().into_iter().flatten().enumerate() {
                if block["type"] == "tool_use" {
                    let input = block["input"].to_string();
                    let call = self.tools.entry(index as u64).or_default();
                    call.name = block["name"].as_str().unwrap_or_default().to_owned();
                    call.input_bytes = input.len();
                    call.preview = input.chars().take(TOOL_INPUT_PREVIEW).collect();
                }
            }
        }
        self.pending.clear();
    }

    fn usage(&mut self, usage: &Value) {
        // message_delta carries cumulative counts: the latest value wins.
        let set = |field: &mut i64, key: &str| {
            if let Some(n) = usage[key].as_i64() {
                *field = n;
            }
        };
        set(&mut self.input_tokens, "input_tokens");
        set(&mut self.output_tokens, "output_tokens");
        set(&mut self.cache_read_tokens, "cache_read_input_tokens");
        set(&mut self.cache_creation_tokens, "cache_creation_input_tokens");
    }

    fn event(&mut self, event: &Value) {
        match event["type"].as_str() {
            Some("message_start") => {
                self.model = event["message"]["model"].as_str().map(str::to_owned);
                self.usage(&event["message"]["usage"]);
            }
            Some("message_delta") => self.usage(&event["usage"]),
            Some("content_block_start") if event["content_block"]["type"] == "tool_use" => {
                let index = event["index"].as_u64().unwrap_or_default();
                let name = event["content_block"]["name"].as_str().unwrap_or_default().to_owned();
                self.tools.insert(index, ToolCall { name, ..ToolCall::default() });
            }
            Some("content_block_delta") if event["delta"]["type"] == "input_json_delta" => {
                let index = event["index"].as_u64().unwrap_or_default();
                if let Some(call) = self.tools.get_mut(&index) {
                    let part = event["delta"]["partial_json"].as_str().unwrap_or_default();
                    call.input_bytes += part.len();
                    let room = TOOL_INPUT_PREVIEW.saturating_sub(call.preview.chars().count());
                    call.preview.extend(part.chars().take(room));
                }
            }
            _ => {}
        }
    }

    /// Tokens of the response, priced with `prices`.
    pub fn totals(&self, prices: &BTreeMap<String, ModelPrice>) -> UsageTotals {
        let mut usage = UsageTotals {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
            total_cost_usd: 0.0,
        };
        usage.total_cost_usd = price_of(prices, self.model.as_deref()).cost(&usage);
        usage
    }

    /// The tool calls as the audit log stores them.
    pub fn tool_calls(&self) -> Value {
        Value::Array(
            self.tools
                .values()
                .map(|t| json!({"name": t.name, "input_bytes": t.input_bytes, "input": t.preview}))
                .collect(),
        )
    }
}

/// The price of `model`: the entry whose name is the longest prefix of it,
/// else `default`, else nothing (free).
pub fn price_of(prices: &BTreeMap<String, ModelPrice>, model: Option<&str>) -> ModelPrice {
    let model = model.unwrap_or_default();
    prices
        .iter()
        .filter(|(prefix, _)| prefix.as_str() != "default" && model.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .or_else(|| prices.get_key_value("default"))
        .map(|(_, price)| *price)
        .unwrap_or_default()
}

impl ModelPrice {
    /// USD for `usage` (prices are per million tokens).
    pub fn cost(&self, usage: &UsageTotals) -> f64 {
        let per_token = |price: f64, tokens: i64| price * tokens as f64 / 1_000_000.0;
        per_token(self.input, usage.input_tokens)
            + per_token(self.output, usage.output_tokens)
            + per_token(self.cache_read, usage.cache_read_tokens)
            + per_token(self.cache_write, usage.cache_creation_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices() -> BTreeMap<String, ModelPrice> {
        let price = |input: f64, output: f64| ModelPrice { input, output, cache_read: input / 10.0, cache_write: 0.0 };
        [
            ("default".to_owned(), price(1.0, 2.0)),
            ("claude-opus".into(), price(15.0, 75.0)),
            ("claude-opus-9".into(), price(5.0, 25.0)),
        ]
        .into()
    }

    #[test]
    fn streamed_usage_and_tools_are_read_across_chunk_boundaries() {
        let body = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4\",\"usage\":{\"input_tokens\":1000,\"output_tokens\":1,\"cache_read_input_tokens\":100}}}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"name\":\"Bash\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"command\\\": \"}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"ls\\\"}\"}}\n\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2000}}\n\n",
        );
        // Every split point gives the same reading.
        for split in [1, 7, 50, 133, body.len() - 1] {
            let mut meter = ResponseMeter::new(true);
            meter.feed(&body.as_bytes()[..split]);
            meter.feed(&body.as_bytes()[split..]);
            meter.finish();
            let usage = meter.totals(&prices());
            assert_eq!((usage.input_tokens, usage.output_tokens, usage.cache_read_tokens), (1000, 2000, 100));
            // claude-opus: 15 and 75 per million, cache reads 1.5.
            let expected = 0.015 + 0.15 + 0.00015;
            assert!((usage.total_cost_usd - expected).abs() < 1e-12, "{}", usage.total_cost_usd);
            assert_eq!(
                meter.tool_calls(),
                json!([{"name": "Bash", "input_bytes": 17, "input": "{\"command\": \"ls\"}"}])
            );
        }
    }

    #[test]
    fn a_json_body_is_read_at_the_end() {
        let mut meter = ResponseMeter::new(false);
        let body = json!({"model": "claude-opus-9-1", "usage": {"input_tokens": 10, "output_tokens": 20},
            "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "name": "Read", "input": {"file_path": "x"}}]});
        let bytes = body.to_string();
        meter.feed(&bytes.as_bytes()[..5]);
        meter.feed(&bytes.as_bytes()[5..]);
        meter.finish();
        let usage = meter.totals(&prices());
        assert_eq!((usage.input_tokens, usage.output_tokens), (10, 20));
        assert!((usage.total_cost_usd - (5.0 * 10.0 + 25.0 * 20.0) / 1e6).abs() < 1e-12);
        assert_eq!(meter.tool_calls()[0]["name"], "Read");
    }

    #[test]
    fn prices_by_longest_prefix_then_default() {
        assert_eq!(price_of(&prices(), Some("claude-opus-9-1")).input, 5.0);
        assert_eq!(price_of(&prices(), Some("claude-opus-4")).input, 15.0);
        assert_eq!(price_of(&prices(), Some("gpt")).input, 1.0);
        assert_eq!(price_of(&prices(), None).input, 1.0);
        assert_eq!(price_of(&BTreeMap::new(), Some("x")).input, 0.0);
    }

    #[test]
    fn long_tool_input_is_truncated_but_counted() {
        let mut meter = ResponseMeter::new(true);
        meter.feed(b"data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"name\":\"Write\"}}\n");
        let part = "x".repeat(3000);
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": part}});
        meter.feed(format!("data: {delta}\n").as_bytes());
        let calls = meter.tool_calls();
        assert_eq!(calls[0]["input_bytes"], 3000);
        assert_eq!(calls[0]["input"].as_str().map(str::len), Some(1000));
    }
}
