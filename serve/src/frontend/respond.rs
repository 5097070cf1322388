//! The completions endpoints: a request's tokens as server-sent events or one JSON answer.

use super::*;

pub(crate) async fn completions(State(fe): State<Arc<Frontend>>, body: Bytes) -> Response {
    serve(fe, &body, false).await
}

pub(crate) async fn chat(State(fe): State<Arc<Frontend>>, body: Bytes) -> Response {
    serve(fe, &body, true).await
}

pub(crate) async fn serve(fe: Arc<Frontend>, body: &[u8], chat: bool) -> Response {
    let g = match parse(&fe, body, chat) {
        Ok(g) => g,
        Err(e) => {
            *fe.metrics.lock().requests.entry("invalid").or_default() += 1;
            return e.into_response();
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(drive(Arc::clone(&fe), g.clone(), tx));
    let id = format!(
        "{}-{:x}{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        fe.instance,
        nanos()
    );
    let created = now_s();
    let model = fe.cfg.model.clone();
    let prompt_tokens = g.prompt.len();
    let usage = move |n: usize, cached: u32| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": n,
               "total_tokens": prompt_tokens + n,
               "prompt_tokens_details": {"cached_tokens": cached}})
    };
    let want_lp = g.logprobs;
    // OpenAI's logprobs object for `text` (its characters are its tokens) starting at `offset`.
    let lp_json = move |text: &str, lps: &[f32], offset: usize| -> Value {
        if !want_lp {
            return Value::Null;
        }
        let toks: Vec<String> = text.chars().map(String::from).collect();
        if chat {
            let content: Vec<Value> = toks
                .iter()
                .zip(lps)
                .map(|(t, lp)| {
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []})
                })
                .collect();
            json!({"content": content})
        } else {
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": null,
                   "text_offset": (offset..offset + toks.len()).collect::<Vec<_>>()})
        }
    };
    if !g.stream {
        let mut text = String::new();
        let mut lps = Vec::new();
        loop {
            match rx.recv().await {
                Some(Out::Text(t, l)) => {
                    text.push_str(&t);
                    lps.extend(l);
                }
                Some(Out::Done {
                    finish,
                    completion_tokens,
                    cached,
                }) => {
                    let lp = lp_json(&text, &lps, 0);
                    let choice = if chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish, "logprobs": lp})
                    } else {
                        json!({"index": 0, "text": text, "finish_reason": finish,
                               "logprobs": lp})
                    };
                    return Json(json!({
                        "id": id,
                        "object": if chat { "chat.completion" } else { "text_completion" },
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": usage(completion_tokens, cached),
                    }))
                    .into_response();
                }
                Some(Out::Error(e)) => return e.into_response(),
                None => {
                    return ApiError::unavailable("the request ended without an answer")
                        .into_response()
                }
            }
        }
    }
    let include_usage = g.include_usage;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value| {
        json!({"id": id, "object": object, "created": created, "model": model,
               "choices": [choice]})
    };
    let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    // (channel, first chunk pending, finished, characters sent)
    let state = (rx, chat, false, 0usize);
    let stream = futures_util::stream::unfold(state, move |(mut rx, mut first, done, sent)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            if first {
                first = false;
                let c = chunk(
                    json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": null, "logprobs": null}),
                );
                return Some((
                    Ok::<_, std::convert::Infallible>(sse(&c)),
                    (rx, first, false, sent),
                ));
            }
            match rx.recv().await {
                Some(Out::Text(t, l)) => {
                    let lp = lp_json(&t, &l, sent);
                    let n = t.len();
                    let c = if chat {
                        chunk(json!({"index": 0, "delta": {"content": t},
                                     "finish_reason": null, "logprobs": lp}))
                    } else {
                        chunk(json!({"index": 0, "text": t, "finish_reason": null,
                                     "logprobs": lp}))
                    };
                    Some((Ok(sse(&c)), (rx, first, false, sent + n)))
                }
                Some(Out::Done {
                    finish,
                    completion_tokens,
                    cached,
                }) => {
                    let c = if chat {
                        chunk(json!({"index": 0, "delta": {}, "finish_reason": finish,
                                     "logprobs": null}))
                    } else {
                        chunk(json!({"index": 0, "text": "", "finish_reason": finish,
                                     "logprobs": null}))
                    };
                    let mut out = format!("data: {c}\n\n");
                    if include_usage {
                        let mut u = chunk(Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(completion_tokens, cached);
                        out.push_str(&format!("data: {u}\n\n"));
                    }
                    out.push_str("data: [DONE]\n\n");
                    Some((Ok(Bytes::from(out)), (rx, first, true, sent)))
                }
                Some(Out::Error(e)) => {
                    let out = format!("data: {}\n\n", e.body());
                    Some((Ok(Bytes::from(out)), (rx, first, true, sent)))
                }
                None => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::unavailable("response").into_response())
}
