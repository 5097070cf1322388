//! How to pull ([`PullOptions`]), where chunks come from when no source has them
//! ([`Fallback`]), and what a pull did ([`PullReport`]).

use super::*;

/// Have-byte READs a refresh keeps in flight at once (its scratch buffer holds this many).
pub const REFRESH_BATCH: usize = 16;

/// Where chunks come from when no live source has them.
#[derive(Clone, Debug)]
pub enum Fallback {
    /// A local copy of the model directory.
    Dir(PathBuf),
    /// The model's files as objects `PREFIX<file name>` in an S3-compatible bucket, read with
    /// ranged GETs through the agent's `object` backend (endpoint and credentials from its
    /// `[object]` configuration or the `AWS_*` environment).
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix (empty, or ending in `/`).
        prefix: String,
    },
}

/// Object ids this crate names for an S3 fallback: `OBJECT_ID_BASE + file index`.
pub const OBJECT_ID_BASE: u64 = 0x5757_0000_0000;

impl Fallback {
    /// `s3://bucket/prefix` or a directory path.
    pub fn parse(s: &str) -> Result<Fallback> {
        match s.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(Error::Invalid(format!("{s}: no bucket")));
                }
                let mut prefix = prefix.to_owned();
                if !prefix.is_empty() && !prefix.ends_with('/') {
                    prefix.push('/');
                }
                Ok(Fallback::S3 {
                    bucket: bucket.to_owned(),
                    prefix,
                })
            }
            None => Ok(Fallback::Dir(PathBuf::from(s))),
        }
    }
}

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Model name.
    pub name: String,
    /// Source addresses (`HOST:PORT` of their tcp listeners).
    pub sources: Vec<String>,
    /// Storage fallback.
    pub fallback: Option<Fallback>,
    /// Become a source while pulling (each chunk served once verified).
    pub serve: bool,
    /// READs in flight per source.
    pub streams_per_source: usize,
    /// READs in flight per origin (a source complete from the start), at most
    /// `streams_per_source`: N replicas that start at once queue at most this times N READs on
    /// the origin's link, so none waits there past the tcp backend's no-progress timeout (a
    /// timed-out READ is sent again), and the replicas serve each other the rest.
    pub origin_streams: usize,
    /// One bounded attempt to reach a source (metadata and header).
    pub connect_timeout: Duration,
    /// Longest a chunk READ may take before its source is taken for dead.
    pub chunk_timeout: Duration,
    /// Longest the pull may go without progress before it gives up.
    pub stall_timeout: Duration,
    /// Progress line on stderr.
    pub progress: bool,
    /// The manifest to pull by when no source answers (as a pull leaves it beside the files,
    /// [`crate::MANIFEST_FILE`]): needed with an S3 fallback alone.
    pub manifest: Option<PathBuf>,
    /// Test-only fault hook: sources (by address, as given in `sources`) read from only once
    /// every other source has been dropped, so a test decides which source serves first
    /// instead of the machine's load deciding it.
    pub fault_hold_back: Vec<String>,
}

impl PullOptions {
    /// Defaults for `name`.
    pub fn new(name: impl Into<String>) -> PullOptions {
        PullOptions {
            name: name.into(),
            sources: Vec::new(),
            fallback: None,
            serve: false,
            streams_per_source: 1,
            origin_streams: 1,
            connect_timeout: Duration::from_secs(3),
            chunk_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            progress: false,
            manifest: None,
            fault_hold_back: Vec::new(),
        }
    }
}

/// What a pull did.
#[derive(Clone, Debug, Default)]
pub struct PullReport {
    /// Model id (`name@digest`).
    pub model_id: String,
    /// Bytes of the model.
    pub bytes: u64,
    /// Wall time of the transfer phase.
    pub seconds: f64,
    /// Bytes taken from each source (by address).
    pub sources: BTreeMap<String, u64>,
    /// Bytes read from the fallback.
    pub fallback_bytes: u64,
    /// Every chunk verified (always true in a report: a pull that cannot verify fails).
    pub verified: bool,
    /// Chunks that failed their checksum (and were fetched again elsewhere).
    pub corrupt_chunks: u64,
    /// Sources dropped during the pull, with the reason.
    pub dropped: Vec<String>,
    /// Sources skipped at the start (unreachable, or not serving this model), with the reason.
    pub skipped: Vec<String>,
    /// Chunk writes to the output files (equals the chunk count: nothing is written twice).
    pub chunks_written: u64,
}
