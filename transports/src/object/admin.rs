//! Listing and deleting objects: `ListObjectsV2` (continuation tokens followed) and `DELETE`,
//! for callers that manage what they stored (checkpoints removing a replaced save's objects).
//!
//! A LIST answer is untrusted input: it is read up to [`MAX_LIST_ANSWER`] bytes (a longer one
//! is an error, not cut short), must be UTF-8 with a `ListBucketResult` root, at most
//! [`PAGE_KEYS`] entries, keys of at most [`MAX_KEY_BYTES`] under the prefix asked for, in
//! strictly increasing order across pages (as S3 lists them), sizes that parse, and a
//! continuation token when it says it is truncated, never one it gave before. The whole listing
//! is bounded by the caller's `limit` (more objects are an error, not a partial list).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;

use super::s3::{error_chain, status_error, xml_text, ReqBody, S3Req, S3};

/// Entries asked for per LIST page (`max-keys`), and the most one page may hold.
pub(super) const PAGE_KEYS: usize = 1000;
/// Longest LIST answer read.
pub(super) const MAX_LIST_ANSWER: usize = 4 << 20;
/// Longest key (S3's own limit).
pub(super) const MAX_KEY_BYTES: usize = 1024;
/// Longest continuation token accepted.
const MAX_TOKEN_BYTES: usize = 4096;

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedObject {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// One page of a `ListObjectsV2` answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ListPage {
    pub(crate) objects: Vec<ListedObject>,
    /// The token of the next page, when the answer says it is truncated.
    pub(crate) next: Option<String>,
}

/// Parses one `ListObjectsV2` answer for `prefix` (see the module's rules).
pub(crate) fn parse_list(
    doc: &[u8],
    prefix: &str,
    delimiter: Option<&str>,
) -> Result<ListPage, String> {
    let doc = std::str::from_utf8(doc).map_err(|e| format!("the answer is not UTF-8: {e}"))?;
    if !doc.contains("<ListBucketResult") {
        return Err("the answer is not a ListBucketResult document".into());
    }
    let mut objects = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find("<Contents>") {
        let body_start = i + "<Contents>".len();
        let end = rest[body_start..]
            .find("</Contents>")
            .ok_or("a <Contents> element is not closed")?;
        let entry = &rest[body_start..body_start + end];
        rest = &rest[body_start + end + "</Contents>".len()..];
        if objects.len() == PAGE_KEYS {
            return Err(format!("more than {PAGE_KEYS} entries in one page"));
        }
        let key = xml_text(entry, "Key").ok_or("an entry without <Key>")?;
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "an entry's key is {} bytes (1..={MAX_KEY_BYTES})",
                key.len()
            ));
        }
        if !key.starts_with(prefix) {
            return Err(format!(
                "key {key:?} is not under the prefix asked for ({prefix:?})"
            ));
        }
        if let Some(d) = delimiter.filter(|d| !d.is_empty()) {
            if key[prefix.len()..].contains(d) {
                return Err(format!(
                    "key {key:?} holds the delimiter {d:?} past the prefix {prefix:?}"
                ));
            }
        }
        let size = xml_text(entry, "Size").ok_or_else(|| format!("key {key:?} has no <Size>"))?;
        let size = size
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("key {key:?} has size {size:?}"))?;
        objects.push(ListedObject { key, size });
    }
    let truncated = match xml_text(doc, "IsTruncated").as_deref().map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(format!("<IsTruncated> is {v:?}")),
    };
    let next = if truncated {
        let t = xml_text(doc, "NextContinuationToken")
            .filter(|t| !t.is_empty())
            .ok_or("truncated without a <NextContinuationToken>")?;
        if t.len() > MAX_TOKEN_BYTES {
            return Err(format!("a continuation token of {} bytes", t.len()));
        }
        Some(t)
    } else {
        None
    };
    Ok(ListPage { objects, next })
}

/// Reads a body of at most `limit` bytes; a longer one is an error.
async fn read_bounded(mut body: Incoming, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error_chain(&e))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("the answer is longer than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.into())
}

/// Every object of `bucket` whose key starts with `prefix` (and, with a delimiter, holds none
/// past the prefix: the prefix's direct children), in key order; more than `limit` objects is
/// an error. Each request is bounded by `timeout`.
pub(crate) async fn list_all(
    s3: &S3,
    bucket: &str,
    prefix: &str,
    delimiter: Option<&str>,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<ListedObject>, String> {
    let mut out: Vec<ListedObject> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    loop {
        let mut query = vec![
            ("list-type", "2".to_owned()),
            ("prefix", prefix.to_owned()),
            ("max-keys", PAGE_KEYS.to_string()),
        ];
        if let Some(t) = tokens.last() {
            query.push(("continuation-token", t.clone()));
        }
        if let Some(d) = delimiter {
            query.push(("delimiter", d.to_owned()));
        }
        let req = S3Req {
            method: Method::GET,
            bucket,
            key: "",
            query,
            range: None,
            body: ReqBody::Empty,
        };
        let what = format!("LIST {bucket}/{prefix}*");
        let page = tokio::time::timeout(timeout, async {
            let resp = s3.send(&req).await?;
            let (parts, body) = resp.into_parts();
            let bytes = read_bounded(body, MAX_LIST_ANSWER)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            if !parts.status.is_success() {
                return Err(status_error(&what, parts.status, &bytes));
            }
            parse_list(&bytes, prefix, delimiter).map_err(|e| format!("{what}: bad answer: {e}"))
        })
        .await
        .map_err(|_| format!("{what}: no answer within {timeout:?}"))??;
        for o in page.objects {
            if let Some(last) = out.last() {
                if o.key <= last.key {
                    return Err(format!(
                        "{what}: bad answer: key {:?} listed after {:?} (keys must come in \
                         increasing order, each once)",
                        o.key, last.key
                    ));
                }
            }
            if out.len() == limit {
                return Err(format!("{what}: more than {limit} objects"));
            }
            out.push(o);
        }
        match page.next {
            None => return Ok(out),
            Some(t) if tokens.contains(&t) => {
                return Err(format!(
                    "{what}: bad answer: continuation token {t:?} given twice"
                ))
            }
            Some(t) => tokens.push(t),
        }
    }
}

/// Deletes `keys` of `bucket`, `conc` at a time; an object already gone is not an error.
/// Returns how many requests succeeded; the first failure is the error.
pub(crate) async fn delete_all(
    s3: &Arc<S3>,
    bucket: &str,
    keys: &[String],
    conc: usize,
    timeout: Duration,
) -> Result<usize, String> {
    let mut set = tokio::task::JoinSet::new();
    let mut done = 0;
    let mut first_err = None;
    let mut it = keys.iter();
    loop {
        while set.len() < conc.max(1) {
            let Some(k) = it.next() else { break };
            let (s3, bucket, key) = (Arc::clone(s3), bucket.to_owned(), k.clone());
            set.spawn(async move {
                let req = S3Req {
                    method: Method::DELETE,
                    bucket: &bucket,
                    key: &key,
                    query: Vec::new(),
                    range: None,
                    body: ReqBody::Empty,
                };
                let what = req.what();
                tokio::time::timeout(timeout, async {
                    let resp = s3.send(&req).await?;
                    let (parts, body) = resp.into_parts();
                    let bytes = read_bounded(body, 1 << 20).await.unwrap_or_default();
                    if parts.status.is_success() || parts.status == hyper::StatusCode::NOT_FOUND {
                        Ok(())
                    } else {
                        Err(status_error(&what, parts.status, &bytes))
                    }
                })
                .await
                .map_err(|_| format!("{what}: no answer within {timeout:?}"))?
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        match r {
            Ok(Ok(())) => done += 1,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(format!("a DELETE task failed: {e}"));
            }
        }
        if first_err.is_some() {
            // Stop sending more; let those in flight end.
            it = [].iter();
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: &[(&str, &str)], trunc: Option<&str>) -> String {
        let mut s = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>b</Name>",
        );
        for (k, n) in entries {
            s += &format!("<Contents><Key>{k}</Key><Size>{n}</Size></Contents>");
        }
        match trunc {
            Some(t) => {
                s += &format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{t}</NextContinuationToken>"
            )
            }
            None => s += "<IsTruncated>false</IsTruncated>",
        }
        s + "</ListBucketResult>"
    }

    #[test]
    fn list_answers_parse_strictly() {
        let p = parse_list(
            page(&[("p/a", "1"), ("p/b&amp;c", "22")], Some("t1")).as_bytes(),
            "p/",
            None,
        )
        .unwrap();
        assert_eq!(
            p.objects,
            vec![
                ListedObject {
                    key: "p/a".into(),
                    size: 1
                },
                ListedObject {
                    key: "p/b&c".into(),
                    size: 22
                }
            ]
        );
        assert_eq!(p.next.as_deref(), Some("t1"));
        let p = parse_list(page(&[], None).as_bytes(), "p/", None).unwrap();
        assert!(p.objects.is_empty() && p.next.is_none());
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (b"\xff\xfe".to_vec(), "UTF-8"),
            (
                b"<Error><Code>x</Code></Error>".to_vec(),
                "ListBucketResult",
            ),
            (
                page(&[("q/a", "1")], None).into_bytes(),
                "not under the prefix",
            ),
            (page(&[("p/a", "-1")], None).into_bytes(), "size"),
            (
                page(&[("p/a", "99999999999999999999")], None).into_bytes(),
                "size",
            ),
            (page(&[("", "1")], None).into_bytes(), "key is 0 bytes"),
            (
                "<ListBucketResult><Contents><Key>p/a</Key><Size>1</Size>"
                    .as_bytes()
                    .to_vec(),
                "not closed",
            ),
            (
                "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>"
                    .as_bytes()
                    .to_vec(),
                "without <Key>",
            ),
            (
                "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>"
                    .as_bytes()
                    .to_vec(),
                "without a <NextContinuationToken>",
            ),
            (
                "<ListBucketResult><IsTruncated>maybe</IsTruncated></ListBucketResult>"
                    .as_bytes()
                    .to_vec(),
                "IsTruncated",
            ),
        ];
        for (doc, want) in bad {
            let e = parse_list(&doc, "p/", None).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = parse_list(page(&[("p/a/b", "1")], None).as_bytes(), "p/", Some("/")).unwrap_err();
        assert!(e.contains("delimiter"), "{e}");
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let e = parse_list(page(&[(&long, "1")], None).as_bytes(), "", None).unwrap_err();
        assert!(e.contains("1025 bytes"), "{e}");
        let many: Vec<(String, &str)> =
            (0..=PAGE_KEYS).map(|i| (format!("k{i:05}"), "1")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let e = parse_list(page(&many, None).as_bytes(), "", None).unwrap_err();
        assert!(e.contains("more than 1000 entries"), "{e}");
    }

    /// A server that answers each request with `answer(request line)`, one connection each.
    fn fake(answer: impl Fn(&str) -> Option<Vec<u8>> + Send + 'static) -> String {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                match answer(&line) {
                    Some(body) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = c.write_all(&body);
                    }
                    // Silent: keep the connection open, answer nothing.
                    None => std::thread::sleep(Duration::from_secs(5)),
                }
            }
        });
        at
    }

    fn list(at: &str, limit: usize) -> Result<Vec<ListedObject>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s3 = crate::object::s3::test_client(at);
        rt.block_on(list_all(
            &s3,
            "b",
            "p/",
            None,
            limit,
            Duration::from_millis(500),
        ))
    }

    #[test]
    fn listings_follow_tokens_and_refuse_lying_servers() {
        // Two pages, the second asked for with the first's token.
        let at = fake(|l| {
            Some(
                if l.contains("continuation-token=t1") {
                    page(&[("p/c", "3")], None)
                } else {
                    page(&[("p/a", "1"), ("p/b", "2")], Some("t1"))
                }
                .into_bytes(),
            )
        });
        let got = list(&at, 10).unwrap();
        let keys: Vec<&str> = got.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["p/a", "p/b", "p/c"]);
        assert_eq!(got[2].size, 3);
        let e = list(&at, 2).unwrap_err();
        assert!(e.contains("more than 2 objects"), "{e}");
        // The same token forever.
        let at = fake(|_| Some(page(&[], Some("again")).into_bytes()));
        let e = list(&at, 10).unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        // Fresh tokens, but the same keys again.
        let n = std::sync::atomic::AtomicUsize::new(0);
        let at = fake(move |_| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(page(&[("p/a", "1")], Some(&format!("t{i}"))).into_bytes())
        });
        let e = list(&at, 10).unwrap_err();
        assert!(e.contains("increasing order"), "{e}");
        // An endless answer.
        let at = fake(|_| Some(vec![b' '; MAX_LIST_ANSWER + 1]));
        let e = list(&at, 10).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        // Garbage, and a server that never answers.
        let at = fake(|_| Some(b"<html>hello</html>".to_vec()));
        let e = list(&at, 10).unwrap_err();
        assert!(
            e.contains("bad answer") && e.contains("ListBucketResult"),
            "{e}"
        );
        let at = fake(|_| None);
        let e = list(&at, 10).unwrap_err();
        assert!(e.contains("no answer within"), "{e}");
    }
}
