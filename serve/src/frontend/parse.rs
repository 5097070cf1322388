//! A request's body, checked and turned into what drives it ([`Gen`]).

use super::*;

/// A parsed generation request.
#[derive(Debug, Clone)]
pub(crate) struct Gen {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f32,
    pub(crate) seed: u64,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) stop: Vec<String>,
    pub(crate) logprobs: bool,
}

pub(crate) fn parse(fe: &Frontend, body: &[u8], chat: bool) -> Result<Gen, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    let Some(o) = v.as_object() else {
        return Err(ApiError::bad(
            "The request body must be a JSON object.",
            None,
        ));
    };
    let model = match o.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad(
                "you must provide a model parameter",
                Some("model"),
            ))
        }
        Some(_) => return Err(ApiError::bad("model must be a string", Some("model"))),
    };
    if model != fe.cfg.model {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let get = |k: &str| o.get(k).filter(|v| !v.is_null());
    let mut prompt = vec![BOS];
    if chat {
        let Some(Value::Array(msgs)) = get("messages") else {
            return Err(ApiError::bad("messages must be an array", Some("messages")));
        };
        if msgs.is_empty() {
            return Err(ApiError::bad(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        for m in msgs {
            let role = m.get("role").and_then(Value::as_str);
            let Some(role) =
                role.filter(|r| ["system", "developer", "user", "assistant", "tool"].contains(r))
            else {
                return Err(ApiError::bad(
                    "each message needs a role: system, developer, user, assistant or tool",
                    Some("messages"),
                ));
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    "only text content parts are supported",
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    s
                }
                _ => {
                    return Err(ApiError::bad(
                        "each message needs a string content",
                        Some("messages"),
                    ))
                }
            };
            prompt.extend(format!("{role}: {content}\n").bytes().map(u32::from));
        }
        prompt.extend(b"assistant: ".iter().map(|&b| b as u32));
    } else {
        match get("prompt") {
            Some(Value::String(s)) => prompt.extend(s.bytes().map(u32::from)),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                prompt.extend(a[0].as_str().unwrap_or("").bytes().map(u32::from))
            }
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                prompt.clear();
                for t in a {
                    match t.as_u64() {
                        Some(x) if x <= BOS as u64 + 1 => prompt.push(x as u32),
                        _ => return Err(ApiError::bad("token ids are 0..=257", Some("prompt"))),
                    }
                }
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::bad(
                    "prompt must be a string, a list of one string, or a list of token ids \
                     (batches of prompts are not supported)",
                    Some("prompt"),
                ))
            }
            None => return Err(ApiError::bad("you must provide a prompt", Some("prompt"))),
            Some(_) => return Err(ApiError::bad("prompt must be a string", Some("prompt"))),
        }
    }
    let int = |k: &'static str| -> Result<Option<u64>, ApiError> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::bad(format!("{k} must be a non-negative integer"), Some(k))
            }),
        }
    };
    let max_key = if chat && get("max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = int(max_key)?.unwrap_or(if chat { 128 } else { 16 });
    if max_tokens == 0 || max_tokens > fe.cfg.max_tokens as u64 {
        return Err(ApiError::bad(
            format!("{max_key} must be in 1..={}", fe.cfg.max_tokens),
            Some(if chat && max_key == "max_completion_tokens" {
                "max_completion_tokens"
            } else {
                "max_tokens"
            }),
        ));
    }
    if prompt.len() as u64 + max_tokens > fe.cfg.max_seq as u64 {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {} tokens. However, you requested {} \
                 tokens ({} in the prompt, {max_tokens} for the completion).",
                fe.cfg.max_seq,
                prompt.len() as u64 + max_tokens,
                prompt.len()
            ),
            kind: "invalid_request_error",
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        });
    }
    let temperature = match get("temperature") {
        None => 1.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            _ => {
                return Err(ApiError::bad(
                    "temperature must be a number in [0, 2]",
                    Some("temperature"),
                ))
            }
        },
    };
    if let Some(v) = get("top_p") {
        if v.as_f64() != Some(1.0) {
            return Err(ApiError::bad(
                "top_p other than 1 is not supported by this server",
                Some("top_p"),
            ));
        }
    }
    if let Some(n) = int("n")? {
        if n != 1 {
            return Err(ApiError::bad("only n = 1 is supported", Some("n")));
        }
    }
    // The chosen tokens' log-probabilities only (no alternatives).
    let logprobs = match (chat, get("logprobs")) {
        (_, None) | (true, Some(Value::Bool(false))) => false,
        (true, Some(Value::Bool(true))) => true,
        (false, Some(v)) if v.as_u64() == Some(0) => true,
        (true, _) => {
            return Err(ApiError::bad(
                "logprobs must be a boolean",
                Some("logprobs"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "only logprobs = 0 (the chosen tokens' log-probabilities) is supported",
                Some("logprobs"),
            ))
        }
    };
    if int("top_logprobs")?.is_some_and(|n| n > 0) {
        return Err(ApiError::bad(
            "top_logprobs are not supported (only the chosen tokens')",
            Some("top_logprobs"),
        ));
    }
    let seed = match get("seed") {
        None => 0,
        Some(v) => v
            .as_i64()
            .map(|x| x as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::bad("seed must be an integer", Some("seed")))?,
    };
    let stream = match get("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("stream must be a boolean", Some("stream"))),
    };
    let include_usage = get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let stop = match get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(ApiError::bad(
                "stop must be a string or a list of at most 4 strings",
                Some("stop"),
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop strings must not be empty",
            Some("stop"),
        ));
    }
    Ok(Gen {
        prompt,
        max_tokens: max_tokens as u32,
        temperature,
        seed,
        stream,
        include_usage,
        stop,
        logprobs,
    })
}
