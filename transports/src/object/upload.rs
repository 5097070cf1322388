//! Writes: a single PUT, or a multipart upload (parts in parallel, then completed or aborted).

use super::*;

/// The upload id and part ETags of one multipart upload.
#[derive(Debug, Default)]
pub(super) struct Upload {
    pub(super) id: Mutex<Option<String>>,
    pub(super) etags: Mutex<Vec<Option<String>>>,
}

/// What every task of one write shares: the post, the run's handles, the objects and their
/// uploads (cloned once per task).
#[derive(Clone)]
struct Shared {
    p: Arc<Post>,
    r: Run,
    o: Arc<[WriteObj]>,
    u: Arc<[Upload]>,
}

pub(super) async fn write(post: &Arc<Post>, run: &Run, objs: &Arc<[WriteObj]>) {
    let multi: Arc<[usize]> = (0..objs.len()).filter(|&i| objs[i].parts > 0).collect();
    let uploads: Arc<[Upload]> = objs.iter().map(|_| Upload::default()).collect();
    let shared = Shared {
        p: Arc::clone(post),
        r: run.clone(),
        o: Arc::clone(objs),
        u: Arc::clone(&uploads),
    };

    // 1. Start the multipart uploads.
    {
        let (sh, m) = (shared.clone(), Arc::clone(&multi));
        parallel(post, multi.len(), run.conc, move |i| {
            let (Shared { p, r, o, u }, k) = (sh.clone(), m[i]);
            async move {
                let name = &o[k].name;
                let what = || format!("POST {name}?uploads");
                p.guarded(r.timeout, what, async {
                    let req = S3Req {
                        method: Method::POST,
                        bucket: &name.bucket,
                        key: &name.key,
                        query: vec![("uploads", String::new())],
                        range: None,
                        body: ReqBody::Empty,
                    };
                    let (_, body) = r.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
                    let text = String::from_utf8_lossy(&body);
                    let id = s3::xml_text(&text, "UploadId").ok_or_else(|| {
                        backend_err("put", format!("{}: no UploadId in the answer", req.what()))
                    })?;
                    *u[k].id.lock() = Some(id);
                    *u[k].etags.lock() = vec![None; o[k].parts as usize];
                    Ok(())
                })
                .await
            }
        })
        .await;
    }

    // 2. The single PUTs and all parts, in parallel.
    if !post.first_error() {
        let mut jobs: Vec<(usize, u64)> = Vec::new();
        for (k, o) in objs.iter().enumerate() {
            if o.parts == 0 {
                jobs.push((k, 0));
            } else {
                jobs.extend((1..=o.parts).map(|n| (k, n)));
            }
        }
        let jobs: Arc<[(usize, u64)]> = jobs.into();
        let (sh, j) = (shared.clone(), Arc::clone(&jobs));
        parallel(post, jobs.len(), run.conc, move |i| {
            let (Shared { p, r, o, u }, (k, part)) = (sh.clone(), j[i]);
            async move { put_one(&p, &r, &o[k], &u[k], part).await }
        })
        .await;
    }

    // 3. Complete the uploads.
    if !post.first_error() {
        let (sh, m) = (shared, Arc::clone(&multi));
        parallel(post, multi.len(), run.conc, move |i| {
            let (Shared { p, r, o, u }, k) = (sh.clone(), m[i]);
            async move { complete_upload(&p, &r, &o[k], &u[k]).await }
        })
        .await;
    }

    // 4. On failure, abort every upload that was started (best effort, bounded).
    if post.first_error() {
        let mut aborts = tokio::task::JoinSet::new();
        for &k in multi.iter() {
            let Some(id) = uploads[k].id.lock().take() else {
                continue;
            };
            let (s3, name, t) = (Arc::clone(&run.s3), objs[k].name.clone(), run.timeout);
            aborts.spawn(async move {
                let req = S3Req {
                    method: Method::DELETE,
                    bucket: &name.bucket,
                    key: &name.key,
                    query: vec![("uploadId", id)],
                    range: None,
                    body: ReqBody::Empty,
                };
                match tokio::time::timeout(t.min(Duration::from_secs(5)), s3.call(&req)).await {
                    Ok(Ok(_)) => tracing::debug!(object = %name, "multipart upload aborted"),
                    Ok(Err(e)) => tracing::warn!(object = %name, "aborting a failed multipart upload: {e}"),
                    Err(_) => tracing::warn!(object = %name, "aborting a failed multipart upload: no answer"),
                }
            });
        }
        while aborts.join_next().await.is_some() {}
    }
}

/// One PUT: the whole object (`part` 0) or part `part` (from 1) of a multipart upload.
pub(super) async fn put_one(
    post: &Arc<Post>,
    run: &Run,
    o: &WriteObj,
    up: &Upload,
    part: u64,
) -> Result<()> {
    let (off, len, query) = if part == 0 {
        (0, o.len, Vec::new())
    } else {
        let off = (part - 1) * run.part_size;
        let id = up.id.lock().clone().unwrap_or_default();
        (
            off,
            run.part_size.min(o.len - off),
            vec![("partNumber", part.to_string()), ("uploadId", id)],
        )
    };
    // SAFETY: the range lies in registered DRAM checked when the request was created; the
    // post (held by the caller) keeps the completion, and so the registration, alive until
    // after this future, which holds the lease, is gone.
    let (src, _lease) = unsafe { MemSource::lease(o.addr + off, len) };
    let req = S3Req {
        method: Method::PUT,
        bucket: &o.name.bucket,
        key: &o.name.key,
        query,
        range: None,
        body: ReqBody::Mem(src),
    };
    let what = req.what();
    post.guarded(run.timeout, || what.clone(), async {
        let (resp, _) = run.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
        if part > 0 {
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| backend_err("put", format!("{what}: no ETag in the answer")))?;
            up.etags.lock()[(part - 1) as usize] = Some(etag.to_owned());
        }
        Ok(())
    })
    .await
}

pub(super) async fn complete_upload(
    post: &Arc<Post>,
    run: &Run,
    o: &WriteObj,
    up: &Upload,
) -> Result<()> {
    let id = up.id.lock().clone().unwrap_or_default();
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (i, e) in up.etags.lock().iter().enumerate() {
        let e = e
            .as_deref()
            .ok_or_else(|| backend_err("put", format!("{}: part {} missing", o.name, i + 1)))?;
        xml += &format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
            i + 1,
            s3::xml_escape(e)
        );
    }
    xml += "</CompleteMultipartUpload>";
    let req = S3Req {
        method: Method::POST,
        bucket: &o.name.bucket,
        key: &o.name.key,
        query: vec![("uploadId", id)],
        range: None,
        body: ReqBody::Bytes(Bytes::from(xml)),
    };
    let what = req.what();
    post.guarded(run.timeout, || what.clone(), async {
        let (_, body) = run.s3.call(&req).await.map_err(|e| backend_err("put", e))?;
        // S3 may answer 200 and still fail the completion in the body.
        let text = String::from_utf8_lossy(&body);
        if text.contains("<Error>") {
            return Err(backend_err(
                "put",
                s3::status_error(&format!("{what} (complete)"), StatusCode::OK, &body),
            ));
        }
        Ok(())
    })
    .await?;
    // Completed: nothing to abort any more.
    up.id.lock().take();
    Ok(())
}
