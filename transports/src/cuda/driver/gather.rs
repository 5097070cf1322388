//! The gather kernel: many small device-to-device copies in one launch.

use super::*;

/// The PTX of `nixl_gather` (see `gather.ptx`): many copies in one kernel launch.
const GATHER_PTX: &str = concat!(include_str!("../gather.ptx"), "\0");

/// One entry of a gather table, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GatherEntry {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The gather kernel loaded in one device's context: copies a table of runs (in device memory)
/// in one launch, where one `cuMemcpyDtoDAsync` per run costs microseconds of driver time each.
#[derive(Debug)]
pub(crate) struct Gather {
    module: Owned<Module>,
    func: CuFunction,
}

pub(super) struct Module;

// SAFETY: module handles are driver objects usable from any thread (every use makes the
// context current first); a `Gather` is immutable after creation.
unsafe impl Kind for Module {
    type Raw = CuModule;
    const WHAT: &'static str = "gather kernel";

    unsafe fn release(rel: &Releaser<'_>, module: &CuModule) {
        // A module is only loaded where the driver has the module API (`Gather::load`).
        let Some(unload) = rel.opt().module_unload else {
            return;
        };
        // SAFETY: our module; no launch of it is pending once its owner drops it (the tables'
        // requests hold the owner).
        rel.check("cuModuleUnload", unsafe { unload(*module) });
    }
}

// SAFETY: the function handle belongs to the module (`Send` and `Sync`, above) and is only
// passed to the driver, which any thread may call.
unsafe impl Send for Gather {}
// SAFETY: as above.
unsafe impl Sync for Gather {}

/// Threads per block of the gather kernel.
const GATHER_THREADS: u32 = 256;
/// Most blocks of one launch (each loops over its share of the entries).
const GATHER_MAX_BLOCKS: u32 = 8192;

impl Gather {
    /// Loads the kernel into `ctx` (JIT-compiled from PTX by the driver). `Err` when the
    /// driver lacks the module API or refuses the PTX.
    pub(crate) fn load(ctx: &Arc<DeviceCtx>) -> CuRes<Gather> {
        let o = &ctx.drv.opt;
        let (Some(load), Some(get), Some(_), Some(_)) = (
            o.module_load_data,
            o.module_get_function,
            o.module_unload,
            o.launch_kernel,
        ) else {
            return Err(CuError {
                op: "cuModuleLoadData",
                code: CUDA_ERROR_NOT_SUPPORTED,
                name: "the driver lacks the module API".into(),
            });
        };
        let _g = ctx.enter()?;
        // SAFETY: a NUL-terminated PTX image; writes one module handle, ours to unload.
        let module = unsafe {
            Owned::<Module>::make(ctx, "cuModuleLoadData", std::ptr::null_mut(), |m| {
                load(m, GATHER_PTX.as_ptr().cast())
            })
        }?;
        let mut func: CuFunction = std::ptr::null_mut();
        // SAFETY: a live module and a NUL-terminated name; writes one function handle.
        let r = unsafe { get(&mut func, module.raw, c"nixl_gather".as_ptr()) };
        // On an error, dropping `module` unloads it.
        ctx.check("cuModuleGetFunction", r)?;
        Ok(Gather { module, func })
    }

    /// Enqueues the copies of the `n`-entry table at device address `table` on `stream` (of
    /// this device; its context current, as for [`Stream::copy_dtod`]).
    ///
    /// # Safety
    /// `table` must hold `n` [`GatherEntry`]s in device memory, and every entry's source must be
    /// readable and destination writable device memory mapped in this process, all until the
    /// work is complete (as [`Stream::copy_dtod`]).
    pub(crate) unsafe fn launch(&self, stream: &Stream, table: u64, n: u32) -> CuRes<()> {
        if n == 0 {
            return Ok(());
        }
        let ctx = self.module.ctx();
        let launch = ctx.drv.opt.launch_kernel.expect("checked at load");
        let mut p_table = table;
        let mut p_n = n;
        let mut params: [*mut c_void; 2] = [
            (&mut p_table as *mut u64).cast(),
            (&mut p_n as *mut u32).cast(),
        ];
        let blocks = n.min(GATHER_MAX_BLOCKS);
        // SAFETY: a live function of this context; `params` points at the kernel's two
        // parameters (u64, u32), live for the call (the driver copies them); the memory the
        // kernel touches per the contract.
        ctx.check("cuLaunchKernel", unsafe {
            launch(
                self.func,
                blocks,
                1,
                1,
                GATHER_THREADS,
                1,
                1,
                0,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}
