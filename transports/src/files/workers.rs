//! The thread pool of the file engines that block in a system or library call per operation
//! (`posix`'s `preadv`/`pwritev`, `gds`'s `cuFileRead`/`cuFileWrite`).

use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use nixl_core::{Error, Result};
use parking_lot::Mutex;

/// Worker threads taking jobs from one queue; emptied when the pool stops.
pub(crate) struct Workers<J> {
    tx: Mutex<Option<Sender<J>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<J: Send + 'static> Workers<J> {
    /// `n` threads named `nixl-{name}-{i}`, each running `run` on the jobs it takes.
    pub(crate) fn start<F>(name: &str, n: usize, run: F) -> Result<Workers<J>>
    where
        F: Fn(J) + Clone + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::unbounded::<J>();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (rx, run) = (rx.clone(), run.clone());
            let t = std::thread::Builder::new()
                .name(format!("nixl-{name}-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        run(job);
                    }
                })
                .map_err(|e| Error::io(format!("spawning {name} workers"), e))?;
            threads.push(t);
        }
        Ok(Workers {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Queues a job; gives it back when the pool has stopped.
    pub(crate) fn send(&self, job: J) -> std::result::Result<(), J> {
        match &*self.tx.lock() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Stops taking work; queued jobs still run (they end quickly once their requests are
    /// cancelled), then the workers exit.
    pub(crate) fn stop(&self) {
        // The only sender: once it is gone the workers drain the queue and see the end.
        self.tx.lock().take();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}
