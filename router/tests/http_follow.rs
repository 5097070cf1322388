//! The HTTP follower against a real axum server that serves a `KvEventLog` the way a worker
//! does (`/kv/events?since=N`, `/kv/blocks`, `/load`): following, a gap (old events dropped),
//! a restart (ids reset), a dead worker, a worker that never answers, bad answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use nixl_kv::events::{seq_hashes, KvEventLog, StoredBlock};
use nixl_router::wire::{blocks_response, events_response, WorkerLoad};
use nixl_router::{
    EventSource, FollowStatus, Follower, HttpSource, KvIndex, Mode, ResyncReason, Router,
    SourceError, Step,
};
use parking_lot::Mutex;

#[derive(Clone)]
struct Worker {
    name: &'static str,
    log: Arc<Mutex<KvEventLog>>,
    load: Arc<Mutex<WorkerLoad>>,
}

#[derive(serde::Deserialize)]
struct Since {
    since: u64,
}

async fn events(State(w): State<Worker>, Query(q): Query<Since>) -> Response {
    match events_response(w.name, &w.log.lock(), q.since, None) {
        Ok(r) => Json(r).into_response(),
        Err(g) => (StatusCode::GONE, Json(g)).into_response(),
    }
}

async fn blocks(State(w): State<Worker>) -> Response {
    Json(blocks_response(w.name, &w.log.lock(), None)).into_response()
}

async fn load(State(w): State<Worker>) -> Response {
    Json(*w.load.lock()).into_response()
}

async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

async fn worker(name: &'static str, capacity: usize) -> (Worker, String) {
    let w = Worker {
        name,
        log: Arc::new(Mutex::new(KvEventLog::new(capacity))),
        load: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/kv/events", get(events))
        .route("/kv/blocks", get(blocks))
        .route("/load", get(load))
        .with_state(w.clone());
    let url = serve(app).await;
    (w, url)
}

fn chain(start: u32, n: usize) -> Vec<u64> {
    seq_hashes(&(start..start + 16 * n as u32).collect::<Vec<_>>(), 16)
}

fn blocks_of(h: &[u64], from: usize, to: usize) -> Vec<StoredBlock> {
    (from..to)
        .map(|i| StoredBlock {
            hash: h[i],
            parent: i.checked_sub(1).map(|p| h[p]),
        })
        .collect()
}

/// The step that resynced from `blocks` blocks for `reason`.
fn resynced(reason: ResyncReason, blocks: usize) -> Step {
    Step::Resynced { reason, blocks }
}

#[tokio::test]
async fn follows_gaps_and_restarts_over_http() {
    let (w, url) = worker("prefill-0", 4).await;
    let index = KvIndex::shared();
    let src = HttpSource::new(&url).unwrap().expect_worker("prefill-0");
    let mut f = Follower::new("prefill-0", src, index.clone()).resync_every(None);
    let a = chain(0, 32);
    w.log.lock().stored(blocks_of(&a, 0, 4), 16);
    assert_eq!(f.step().await, resynced(ResyncReason::Start, 4));
    w.log.lock().stored(blocks_of(&a, 4, 6), 16);
    w.log.lock().removed(vec![a[5]]);
    assert_eq!(f.step().await, Step::Events(2));
    assert_eq!(index.read().overlap(&a).get("prefill-0"), 5);

    // The log keeps 4 events: 10 more while the follower sleeps make a gap (HTTP 410).
    for i in 5..15 {
        w.log.lock().stored(blocks_of(&a, i, i + 1), 16);
    }
    assert_eq!(f.step().await, resynced(ResyncReason::Gap, 15));
    assert_eq!(index.read().overlap(&a).get("prefill-0"), 15);
    assert_eq!(f.last_id(), 13);

    // Restart: ids start over (the answer's last_id goes backwards).
    let b = chain(9000, 4);
    *w.log.lock() = KvEventLog::new(4);
    w.log.lock().stored(blocks_of(&b, 0, 4), 16);
    assert_eq!(f.step().await, resynced(ResyncReason::Restart, 4));
    assert!(index.read().overlap(&a).is_empty());
    assert_eq!(index.read().overlap(&b).get("prefill-0"), 4);
    assert_eq!(f.status(), FollowStatus::Up);
}

#[tokio::test]
async fn spawned_followers_feed_the_router() {
    let (w0, u0) = worker("w0", 64).await;
    let (w1, u1) = worker("w1", 64).await;
    let router = Router::new(Mode::KvAware {
        overlap_weight: 1.0,
    });
    let _f0 = router.follow(
        "w0",
        HttpSource::new(&u0).unwrap(),
        Duration::from_millis(5),
    );
    let _f1 = router.follow(
        "w1",
        HttpSource::new(&u1).unwrap(),
        Duration::from_millis(5),
    );
    let sys = chain(0, 20);
    w1.log.lock().stored(blocks_of(&sys, 0, 20), 16);
    *w0.load.lock() = WorkerLoad {
        active_requests: 2,
        active_blocks: 7,
        total_blocks: 100,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.overlaps(&sys).get("w1") != 20 || router.load("w0").active_blocks != 7 {
        assert!(Instant::now() < deadline, "the followers did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c = router.choose(&sys, &["w0", "w1"]).unwrap();
    assert_eq!((c.worker.as_str(), c.overlap_blocks), ("w1", 20));
    // w1 evicts its blocks: the router follows and picks by load (w1 idle).
    w1.log.lock().cleared();
    while !router.overlaps(&sys).is_empty() {
        assert!(Instant::now() < deadline, "the clear did not arrive");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(router.choose(&sys, &["w0", "w1"]).unwrap().worker, "w1");
}

#[tokio::test]
async fn dead_and_silent_workers_are_down_not_hangs() {
    // Nothing listens on this port once the listener is dropped.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let index = KvIndex::shared();
    let mut f = Follower::new("gone", HttpSource::new(&dead).unwrap(), index.clone());
    assert!(matches!(f.step().await, Step::Down(_)));
    assert!(matches!(f.status(), FollowStatus::Down(_)));
    assert!(!index.read().worker("gone").unwrap().up);

    // A peer that accepts and never answers: down after the timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let src = HttpSource::new(&url)
        .unwrap()
        .timeout(Duration::from_millis(300));
    let t = Instant::now();
    let r = src.since(0).await;
    assert!(
        matches!(&r, Err(SourceError::Down(m)) if m.contains("no answer")),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // A worker that comes back is followed again.
    let (w, url) = worker("back", 64).await;
    w.log.lock().stored(blocks_of(&chain(0, 2), 0, 2), 16);
    let mut f = Follower::new("back", HttpSource::new(&url).unwrap(), index.clone());
    assert!(matches!(f.step().await, Step::Resynced { blocks: 2, .. }));
}

#[tokio::test]
async fn bad_answers_are_refused() {
    let (_w, url) = worker("someone-else", 64).await;
    let src = HttpSource::new(&url).unwrap().expect_worker("prefill-0");
    let r = src.since(0).await;
    assert!(
        matches!(&r, Err(SourceError::Bad(m)) if m.contains("someone-else")),
        "{r:?}"
    );

    // Malformed JSON, a huge body, an event over the block limit, a 500.
    let app = axum::Router::new()
        .route("/bad/kv/events", get(|| async { "{\"worker\": 3" }))
        .route(
            "/big/kv/blocks",
            get(|| async { "x".repeat(nixl_router::http::MAX_BLOCKS_BYTES + 1) }),
        )
        .route(
            "/many/kv/events",
            get(|| async {
                let hashes: Vec<String> = (0..(nixl_kv::events::MAX_EVENT_BLOCKS as u64 + 1))
                    .map(|i| i.to_string())
                    .collect();
                format!(
                    r#"{{"worker":"x","events":[{{"id":1,"kind":{{"type":"removed","hashes":[{}]}}}}]}}"#,
                    hashes.join(",")
                )
            }),
        )
        .route(
            "/err/kv/events",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        );
    let base = serve(app).await;
    let at = |p: &str| HttpSource::new(&format!("{base}/{p}")).unwrap();
    let r = at("bad").since(0).await;
    assert!(matches!(&r, Err(SourceError::Bad(_))), "{r:?}");
    let r = at("big").all_blocks().await;
    assert!(
        matches!(&r, Err(SourceError::Bad(m)) if m.contains("over")),
        "{r:?}"
    );
    let r = at("many").since(0).await;
    assert!(
        matches!(&r, Err(SourceError::Bad(m)) if m.contains("limit")),
        "{r:?}"
    );
    let r = at("err").since(0).await;
    assert!(
        matches!(&r, Err(SourceError::Down(m)) if m.contains("500")),
        "{r:?}"
    );
    // /load missing: no load, not an error.
    assert_eq!(at("bad").load().await.unwrap(), None);
    for bad in ["", "ftp://x", "127.0.0.1:80", "http://"] {
        assert!(HttpSource::new(bad).is_err(), "{bad}");
    }
}
