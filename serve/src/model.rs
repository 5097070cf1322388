//! The reference transformer: decoder-only, grouped-query attention, RoPE, RMSNorm, SwiGLU,
//! byte-level vocabulary (256 bytes, then `BOS` and `EOS`), f32, plain Rust.
//!
//! Weights come from a seeded PRNG ([`Weights::generate`]) and travel as a safetensors file
//! ([`Weights::save`] / [`Weights::load`]) with the [`ModelConfig`] in its metadata.
//!
//! Determinism: every token is computed by [`Model::step`], one token at a time, whatever the
//! batch: each matrix-vector product sums in one fixed order, attention at position `t` visits
//! keys `0..=t` in order, and nothing is split across threads. So a prefill of a sequence, a
//! decode of it one token at a time, a re-prefill after a migration, and the same KV bytes read
//! from another worker's cache all give bit-identical logits.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Beginning of a sequence.
pub const BOS: u32 = 256;
/// End of a sequence (the output head never chooses it: generation ends by length or stop).
pub const EOS: u32 = 257;
/// Name the frontend serves the model under.
pub const MODEL_NAME: &str = "nixl-ref";
/// File name of the weights in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
const CONFIG_KEY: &str = "nixl_serve_config";

/// Shape of the model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary (256 bytes + specials).
    pub vocab: u32,
    /// Width of the residual stream.
    pub d_model: u32,
    /// Transformer layers.
    pub layers: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention: `heads / kv_heads` queries share one).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Hidden width of the SwiGLU feed-forward.
    pub ffn: u32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Longest sequence (prompt plus generated tokens).
    pub max_seq: u32,
    /// Seed the weights were generated from.
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab: 258,
            d_model: 128,
            layers: 2,
            heads: 8,
            kv_heads: 4,
            head_dim: 16,
            ffn: 256,
            rope_theta: 10000.0,
            eps: 1e-5,
            max_seq: 2048,
            seed: 0x6e69_786c_2d72_7300,
        }
    }
}

impl ModelConfig {
    fn check(&self) -> Result<(), String> {
        let ok = self.vocab > EOS
            && self.vocab <= 1 << 16
            && (1..=64).contains(&self.layers)
            && (1..=4096).contains(&self.d_model)
            && self.kv_heads >= 1
            && self.heads >= self.kv_heads
            && self.heads % self.kv_heads == 0
            && self.head_dim % 2 == 0
            && (2..=512).contains(&self.head_dim)
            && self.heads * self.head_dim <= 16384
            && (1..=16384).contains(&self.ffn)
            && (1..=1 << 20).contains(&self.max_seq);
        if ok {
            Ok(())
        } else {
            Err(format!("model config out of bounds: {self:?}"))
        }
    }
}

/// One layer's weights, matrices row-major `[out][in]`.
#[derive(Clone, Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w1: Vec<f32>,
    w3: Vec<f32>,
    w2: Vec<f32>,
}

/// Every tensor of the model, by name, in f32.
#[derive(Clone, Debug)]
pub struct Weights {
    /// Shape.
    pub config: ModelConfig,
    /// Tensors: name -> (shape, values).
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

/// splitmix64: the project's seeded generator (stable across platforms and versions).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Whether the output head may produce byte `b` (printable ASCII and newline), so generated
/// text is always valid UTF-8.
pub fn printable(t: u32) -> bool {
    t == b'\n' as u32 || (32..127).contains(&t)
}

impl Weights {
    /// The reference weights of `config`, from its seed.
    pub fn generate(config: ModelConfig) -> Weights {
        let c = config;
        let mut rng = Rng(c.seed);
        let (d, q, kv, f) = (
            c.d_model as usize,
            (c.heads * c.head_dim) as usize,
            (c.kv_heads * c.head_dim) as usize,
            c.ffn as usize,
        );
        let mut t = Vec::new();
        // Uniform with the given standard deviation.
        let mut mat = |name: String, rows: usize, cols: usize, std: f32| {
            let a = std * 3f32.sqrt();
            let v: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * a).collect();
            (name, vec![rows, cols], v)
        };
        t.push(mat("embed".into(), c.vocab as usize, d, 1.0));
        for l in 0..c.layers {
            let p = format!("layers.{l}.");
            t.push((format!("{p}attn_norm"), vec![d], vec![1.0; d]));
            t.push(mat(format!("{p}wq"), q, d, 1.0 / (d as f32).sqrt()));
            t.push(mat(format!("{p}wk"), kv, d, 1.0 / (d as f32).sqrt()));
            t.push(mat(format!("{p}wv"), kv, d, 1.0 / (d as f32).sqrt()));
            t.push(mat(format!("{p}wo"), d, q, 0.7 / (q as f32).sqrt()));
            t.push((format!("{p}ffn_norm"), vec![d], vec![1.0; d]));
            t.push(mat(format!("{p}w1"), f, d, 1.0 / (d as f32).sqrt()));
            t.push(mat(format!("{p}w3"), f, d, 1.0 / (d as f32).sqrt()));
            t.push(mat(format!("{p}w2"), d, f, 0.7 / (f as f32).sqrt()));
        }
        t.push(("final_norm".into(), vec![d], vec![1.0; d]));
        t.push(mat(
            "lm_head".into(),
            c.vocab as usize,
            d,
            2.0 / (d as f32).sqrt(),
        ));
        // Only printable bytes are ever chosen; letters and space a little more often.
        let bias: Vec<f32> = (0..c.vocab)
            .map(|b| {
                if !printable(b) {
                    -1e4
                } else if b == b' ' as u32 || (b'a' as u32..=b'z' as u32).contains(&b) {
                    1.5
                } else {
                    0.0
                }
            })
            .collect();
        t.push(("lm_bias".into(), vec![c.vocab as usize], bias));
        Weights { config, tensors: t }
    }

    /// Writes `dir/model.safetensors` (little-endian f32, the config in the metadata).
    pub fn save(&self, dir: &Path) -> Result<std::path::PathBuf, String> {
        use safetensors::tensor::{Dtype, TensorView};
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::new();
        for ((name, shape, _), b) in self.tensors.iter().zip(&bytes) {
            let v = TensorView::new(Dtype::F32, shape.clone(), b).map_err(|e| e.to_string())?;
            views.push((name.clone(), v));
        }
        let meta = HashMap::from([(
            CONFIG_KEY.to_owned(),
            serde_json::to_string(&self.config).map_err(|e| e.to_string())?,
        )]);
        let path = dir.join(WEIGHTS_FILE);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// Reads a model directory (or the safetensors file itself), checking every shape.
    pub fn load(path: &Path) -> Result<Weights, String> {
        let file = if path.is_dir() {
            path.join(WEIGHTS_FILE)
        } else {
            path.to_path_buf()
        };
        let data = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let config: ModelConfig = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CONFIG_KEY))
            .ok_or_else(|| format!("{}: no {CONFIG_KEY} in the metadata", file.display()))
            .and_then(|s| serde_json::from_str(s).map_err(|e| format!("{CONFIG_KEY}: {e}")))?;
        config.check()?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let want = Weights::generate_shapes(&config);
        let mut tensors = Vec::new();
        for (name, shape) in want {
            let v = st
                .tensor(&name)
                .map_err(|e| format!("{}: {name}: {e}", file.display()))?;
            if v.dtype() != safetensors::Dtype::F32 || v.shape() != shape.as_slice() {
                return Err(format!(
                    "{name}: {:?} {:?}, expected F32 {shape:?}",
                    v.dtype(),
                    v.shape()
                ));
            }
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.push((name, shape, vals));
        }
        Ok(Weights { config, tensors })
    }

    fn generate_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (d, q, kv, f, v) = (
            c.d_model as usize,
            (c.heads * c.head_dim) as usize,
            (c.kv_heads * c.head_dim) as usize,
            c.ffn as usize,
            c.vocab as usize,
        );
        let mut s = vec![("embed".to_owned(), vec![v, d])];
        for l in 0..c.layers {
            let p = format!("layers.{l}.");
            s.push((format!("{p}attn_norm"), vec![d]));
            s.push((format!("{p}wq"), vec![q, d]));
            s.push((format!("{p}wk"), vec![kv, d]));
            s.push((format!("{p}wv"), vec![kv, d]));
            s.push((format!("{p}wo"), vec![d, q]));
            s.push((format!("{p}ffn_norm"), vec![d]));
            s.push((format!("{p}w1"), vec![f, d]));
            s.push((format!("{p}w3"), vec![f, d]));
            s.push((format!("{p}w2"), vec![d, f]));
        }
        s.push(("final_norm".into(), vec![d]));
        s.push(("lm_head".into(), vec![v, d]));
        s.push(("lm_bias".into(), vec![v]));
        s
    }
}

/// Where a step reads and writes keys and values: one `head_dim` vector per (layer, position,
/// KV head).
pub trait KvStore {
    /// Stores the key and value of (layer, pos, head).
    fn write(&mut self, layer: u32, pos: u32, head: u32, k: &[f32], v: &[f32]);
    /// Reads the key (`plane` 0) or the value (`plane` 1) of (layer, pos, head) into `out`.
    fn read(&self, layer: u32, plane: u32, pos: u32, head: u32, out: &mut [f32]);
}

/// A plain in-memory [`KvStore`] (tests and references).
#[derive(Debug)]
pub struct VecKv {
    cfg: ModelConfig,
    data: Vec<f32>,
}

impl VecKv {
    /// Room for `cfg.max_seq` positions.
    pub fn new(cfg: &ModelConfig) -> VecKv {
        let n = (cfg.layers * cfg.max_seq * cfg.kv_heads * cfg.head_dim) as usize * 2;
        VecKv {
            cfg: *cfg,
            data: vec![0.0; n],
        }
    }
    fn at(&self, layer: u32, pos: u32, head: u32) -> usize {
        let c = &self.cfg;
        (((layer * c.max_seq + pos) * c.kv_heads + head) * c.head_dim) as usize * 2
    }
}

impl KvStore for VecKv {
    fn write(&mut self, layer: u32, pos: u32, head: u32, k: &[f32], v: &[f32]) {
        let (o, n) = (self.at(layer, pos, head), k.len());
        self.data[o..o + n].copy_from_slice(k);
        self.data[o + n..o + 2 * n].copy_from_slice(v);
    }
    fn read(&self, layer: u32, plane: u32, pos: u32, head: u32, out: &mut [f32]) {
        let n = out.len();
        let o = self.at(layer, pos, head) + plane as usize * n;
        out.copy_from_slice(&self.data[o..o + n]);
    }
}

/// The model, ready to run.
#[derive(Debug)]
pub struct Model {
    /// Shape.
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Vec<f32>,
    lm_bias: Vec<f32>,
}

/// Dot product in one fixed order (eight running sums, combined the same way every time).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `out[r] = W[r] · x` for a row-major `W`.
fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    let n = x.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot(&w[r * n..(r + 1) * n], x);
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = dot(x, x) / x.len() as f32;
    let s = 1.0 / (ss + eps).sqrt();
    for i in 0..x.len() {
        out[i] = x[i] * s * w[i];
    }
}

fn rope(v: &mut [f32], pos: u32, theta: f32) {
    let hd = v.len();
    for i in 0..hd / 2 {
        let f = (pos as f32) * theta.powf(-(2.0 * i as f32) / hd as f32);
        let (s, c) = f.sin_cos();
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
    }
}

impl Model {
    /// The model of `w`.
    pub fn new(w: Weights) -> Model {
        let cfg = w.config;
        let mut map: HashMap<String, Vec<f32>> =
            w.tensors.into_iter().map(|(n, _, v)| (n, v)).collect();
        let mut take = |n: &str| map.remove(n).unwrap_or_default();
        let layers = (0..cfg.layers)
            .map(|l| {
                let p = format!("layers.{l}.");
                Layer {
                    attn_norm: take(&format!("{p}attn_norm")),
                    wq: take(&format!("{p}wq")),
                    wk: take(&format!("{p}wk")),
                    wv: take(&format!("{p}wv")),
                    wo: take(&format!("{p}wo")),
                    ffn_norm: take(&format!("{p}ffn_norm")),
                    w1: take(&format!("{p}w1")),
                    w3: take(&format!("{p}w3")),
                    w2: take(&format!("{p}w2")),
                }
            })
            .collect();
        Model {
            cfg,
            embed: take("embed"),
            layers,
            final_norm: take("final_norm"),
            lm_head: take("lm_head"),
            lm_bias: take("lm_bias"),
        }
    }

    /// Reads a model directory.
    pub fn load(path: &Path) -> Result<Model, String> {
        Ok(Model::new(Weights::load(path)?))
    }

    /// Computes token `token` at position `pos` (keys and values of positions `0..pos` already
    /// in `kv`), writes its keys and values, and returns the logits of the next token.
    pub fn step(&self, token: u32, pos: u32, kv: &mut dyn KvStore) -> Vec<f32> {
        self.run(token, pos, kv, true)
    }

    /// [`Model::step`] without the output head: only the keys and values of the token are
    /// written (the same bytes; a prefill needs the logits of its last token only).
    pub fn advance(&self, token: u32, pos: u32, kv: &mut dyn KvStore) {
        self.run(token, pos, kv, false);
    }

    fn run(&self, token: u32, pos: u32, kv: &mut dyn KvStore, head: bool) -> Vec<f32> {
        let c = &self.cfg;
        let (d, hd) = (c.d_model as usize, c.head_dim as usize);
        let (nq, nkv, f) = (c.heads as usize, c.kv_heads as usize, c.ffn as usize);
        let group = nq / nkv;
        let tok = (token.min(c.vocab - 1)) as usize;
        let mut x = self.embed[tok * d..(tok + 1) * d].to_vec();
        let mut h = vec![0f32; d];
        let mut q = vec![0f32; nq * hd];
        let mut k = vec![0f32; nkv * hd];
        let mut v = vec![0f32; nkv * hd];
        let mut att = vec![0f32; nq * hd];
        let mut o = vec![0f32; d];
        let mut g1 = vec![0f32; f];
        let mut g3 = vec![0f32; f];
        let mut kt = vec![0f32; hd];
        let mut vt = vec![0f32; hd];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let li = li as u32;
            rmsnorm(&x, &l.attn_norm, c.eps, &mut h);
            matvec(&l.wq, &h, &mut q);
            matvec(&l.wk, &h, &mut k);
            matvec(&l.wv, &h, &mut v);
            for hq in q.chunks_exact_mut(hd) {
                rope(hq, pos, c.rope_theta);
            }
            for hk in k.chunks_exact_mut(hd) {
                rope(hk, pos, c.rope_theta);
            }
            for kh in 0..nkv {
                let r = kh * hd..(kh + 1) * hd;
                kv.write(li, pos, kh as u32, &k[r.clone()], &v[r]);
            }
            for kh in 0..nkv {
                // Scores of every query head of this group, over keys 0..=pos in order.
                let heads = kh * group..(kh + 1) * group;
                let mut all = vec![0f32; group * (pos as usize + 1)];
                for t in 0..=pos {
                    kv.read(li, 0, t, kh as u32, &mut kt);
                    for (gi, hq) in heads.clone().enumerate() {
                        all[gi * (pos as usize + 1) + t as usize] =
                            dot(&q[hq * hd..(hq + 1) * hd], &kt) * scale;
                    }
                }
                let n = pos as usize + 1;
                for (gi, hq) in heads.clone().enumerate() {
                    let s = &mut all[gi * n..(gi + 1) * n];
                    let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f32;
                    for x in s.iter_mut() {
                        *x = (*x - m).exp();
                        sum += *x;
                    }
                    for x in s.iter_mut() {
                        *x /= sum;
                    }
                    att[hq * hd..(hq + 1) * hd].fill(0.0);
                }
                // Weighted values, positions in order.
                for t in 0..=pos {
                    kv.read(li, 1, t, kh as u32, &mut vt);
                    for (gi, hq) in heads.clone().enumerate() {
                        let p = all[gi * n + t as usize];
                        let out = &mut att[hq * hd..(hq + 1) * hd];
                        for i in 0..hd {
                            out[i] += p * vt[i];
                        }
                    }
                }
            }
            matvec(&l.wo, &att, &mut o);
            for i in 0..d {
                x[i] += o[i];
            }
            rmsnorm(&x, &l.ffn_norm, c.eps, &mut h);
            matvec(&l.w1, &h, &mut g1);
            matvec(&l.w3, &h, &mut g3);
            for i in 0..f {
                let a = g1[i];
                g1[i] = a / (1.0 + (-a).exp()) * g3[i];
            }
            matvec(&l.w2, &g1, &mut o);
            for i in 0..d {
                x[i] += o[i];
            }
        }
        if !head {
            return Vec::new();
        }
        rmsnorm(&x, &self.final_norm, c.eps, &mut h);
        let mut logits = vec![0f32; c.vocab as usize];
        matvec(&self.lm_head, &h, &mut logits);
        for (l, b) in logits.iter_mut().zip(&self.lm_bias) {
            *l += b;
        }
        logits
    }

    /// Computes `tokens` at positions `start..` one after the other; returns the logits after
    /// each.
    pub fn prefill(&self, tokens: &[u32], start: u32, kv: &mut dyn KvStore) -> Vec<Vec<f32>> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| self.step(t, start + i as u32, kv))
            .collect()
    }
}

/// Log-probability of token `t` under `logits` (temperature 1), summed in one fixed order.
pub fn logprob(logits: &[f32], t: u32) -> f32 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for &l in logits {
        sum += (l - m).exp();
    }
    logits
        .get(t as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - m - sum.ln())
}

/// The greedy choice: the first token of highest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A seeded sample at `temperature` (> 0): the random number depends only on (`seed`, `pos`),
/// so a request migrated to another worker draws the same.
pub fn sample(logits: &[f32], temperature: f32, seed: u64, pos: u32) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let p: Vec<f64> = logits
        .iter()
        .map(|&l| (((l - m) / temperature) as f64).exp())
        .collect();
    let total: f64 = p.iter().sum();
    let mut r = Rng(seed ^ (pos as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut acc = 0.0;
    for (i, x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i as u32;
        }
    }
    argmax(logits)
}
