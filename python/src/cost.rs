//! What a backend's posts have taken: the fit behind `estimate_xfer_cost`.

use nixl_core::BackendName;

/// Durations of the posts a backend completed, fitted to `µs = latency + bytes × per_byte` by
/// exponentially weighted least squares (recent posts weigh most).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CostFit {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    syy: f64,
    count: u64,
}

/// Weight left to a sample after each newer one.
pub(crate) const COST_DECAY: f64 = 0.98;
/// Durations kept per request.
pub(crate) const OWN_SAMPLES: usize = 16;

impl CostFit {
    pub(crate) fn add(&mut self, bytes: u64, us: u64) {
        let (x, y) = (bytes as f64, us as f64);
        for v in [
            &mut self.n,
            &mut self.sx,
            &mut self.sy,
            &mut self.sxx,
            &mut self.sxy,
            &mut self.syy,
        ] {
            *v *= COST_DECAY;
        }
        self.n += 1.0;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.sxy += x * y;
        self.syy += y * y;
        self.count += 1;
    }

    /// `(latency µs, µs per byte, rms residual µs)`, once posts of different sizes were seen.
    pub(crate) fn line(&self) -> Option<(f64, f64, f64)> {
        if self.count < 2 {
            return None;
        }
        let det = self.n * self.sxx - self.sx * self.sx;
        // Sizes must differ by more than rounding: a spread of at least 1 KiB.
        if det.is_nan() || det <= self.n * self.n * 1e6 {
            return None;
        }
        let b = ((self.n * self.sxy - self.sx * self.sy) / det).max(0.0);
        let a = ((self.sy - b * self.sx) / self.n).max(0.0);
        let rss = self.syy - 2.0 * a * self.sy - 2.0 * b * self.sxy
            + a * a * self.n
            + 2.0 * a * b * self.sx
            + b * b * self.sxx;
        Some((a, b, (rss.max(0.0) / self.n).sqrt()))
    }
}

/// What a backend is configured to take before it has been measured here: `(latency µs,
/// bytes per µs)` (bytes per µs is MB/s).
pub(crate) fn cost_prior(b: BackendName) -> (f64, f64) {
    match b {
        BackendName::Local => (1.0, 10_000.0),
        BackendName::Shm => (5.0, 8_000.0),
        BackendName::Tcp => (30.0, 2_000.0),
        BackendName::Rdma => (5.0, 12_000.0),
        BackendName::Cuda => (10.0, 20_000.0),
        BackendName::Gds => (50.0, 5_000.0),
        BackendName::Uring | BackendName::Posix => (50.0, 2_000.0),
        BackendName::Object => (20_000.0, 200.0),
    }
}
