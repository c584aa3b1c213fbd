//! The wgpu backend: one device per process, and linear layers whose weights live on it — dense
//! f32 or in the packed quantized layout, multiplied by the fused WGSL kernel in `matmul.wgsl`
//! (dequantize while loading a tile; the matrix is never expanded to f32).
//!
//! Adapters: Vulkan, Metal or DX12 (never OpenGL, whose compute support varies). A hardware GPU is
//! preferred; without one, Mesa's software Vulkan driver (llvmpipe) is the adapter, which is how
//! CI runs these kernels for real. Matrices larger than the device's storage-binding limit
//! (llvmpipe: 128 MiB) are split by rows into several buffers, and calls whose output would
//! exceed it are split by input rows.
#![allow(clippy::many_single_char_names)] // BLAS names: x, y, w, k, m, n

use std::sync::{Arc, Mutex, OnceLock};

use mcompress_format::quant::Quantized;
use wgpu::util::DeviceExt;

use crate::{Error, Result};

/// An opened wgpu device with the matmul pipeline.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    info: wgpu::AdapterInfo,
    max_binding: u64,
    error: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.describe()).finish_non_exhaustive()
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    k: u32,
    m: u32,
    bits: u32,
    /// 0: integer codes; 1: FP8 E4M3 codes (8 bits, no offset).
    kind: u32,
    groups: u32,
    group_len: u32,
    row_words: u32,
    has_zp: u32,
    has_bias: u32,
    out_stride: u32,
    col0: u32,
}

static GPU: OnceLock<std::result::Result<Arc<Gpu>, String>> = OnceLock::new();

/// The process's wgpu device (opened on first use): the best adapter among Vulkan, Metal and
/// DX12 — a discrete GPU, else an integrated or virtual one, else a software (CPU) adapter.
pub fn device() -> Result<Arc<Gpu>> {
    GPU.get_or_init(|| open().map(Arc::new)).clone().map_err(Error::Backend)
}

fn open() -> std::result::Result<Gpu, String> {
    let backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        flags: wgpu::InstanceFlags::empty(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let adapter = adapters.into_iter().min_by_key(rank).ok_or_else(|| {
        "no wgpu adapter (Vulkan, Metal or DX12) found; on Linux without a GPU install Mesa's software Vulkan \
         driver (Debian/Ubuntu: apt install mesa-vulkan-drivers libvulkan1), or use backend = \"cpu\""
            .to_string()
    })?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("mcompress-eval"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .map_err(|e| format!("wgpu adapter {}: requesting a device: {e}", info.name))?;
    let error = Arc::new(Mutex::new(None::<String>));
    let sink = Arc::clone(&error);
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let mut slot = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.get_or_insert_with(|| e.to_string());
    }));
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("matmul.wgsl"),
        source: wgpu::ShaderSource::Wgsl(include_str!("matmul.wgsl").into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("matmul"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    });
    let layout = pipeline.get_bind_group_layout(0);
    let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let gpu = Gpu { device, queue, pipeline, layout, info, max_binding, error };
    gpu.check()?;
    Ok(gpu)
}

impl Gpu {
    /// Whether the adapter is a hardware GPU (not a CPU/software rasteriser such as llvmpipe).
    pub fn is_hardware(&self) -> bool {
        !matches!(self.info.device_type, wgpu::DeviceType::Cpu)
    }

    /// Adapter, type, API and driver, e.g. `llvmpipe (LLVM 15.0.6, 256 bits); Cpu; Vulkan; Mesa 25.0.7-2~bpo12+1 (LLVM 15.0.6)`.
    pub fn describe(&self) -> String {
        let driver = if self.info.driver_info.is_empty() { &self.info.driver } else { &self.info.driver_info };
        format!("{}; {:?}; {:?}; {driver}", self.info.name, self.info.device_type, self.info.backend)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let mut slot = self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.take() {
            Some(e) => Err(format!("wgpu ({}): {e}", self.info.name)),
            None => Ok(()),
        }
    }

    fn storage(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        // Storage bindings must be non-empty and a multiple of 4 bytes.
        let mut padded;
        let contents = if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
            padded = bytes.to_vec();
            padded.resize(bytes.len().next_multiple_of(4).max(4), 0);
            &padded[..]
        } else {
            bytes
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE,
        })
    }
}

/// One row chunk of a matrix on the device.
struct Chunk {
    row0: usize,
    rows: usize,
    w: wgpu::Buffer,
    scale: wgpu::Buffer,
    zp: wgpu::Buffer,
    bias: wgpu::Buffer,
}

/// How the kernel decodes a matrix (see matmul.wgsl).
#[derive(Clone, Copy, Debug)]
struct Layout {
    bits: u32,
    kind: u32,
    groups: u32,
    group_len: u32,
    row_words: u32,
    has_zp: bool,
}

/// A linear layer's weights on the device.
pub struct GpuLinear {
    gpu: Arc<Gpu>,
    chunks: Vec<Chunk>,
    out: usize,
    inp: usize,
    layout: Layout,
    has_bias: bool,
    /// Bytes per buffer binding (the device limit; smaller in tests to exercise the splits).
    limit: u64,
}

impl std::fmt::Debug for GpuLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLinear")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("bits", &self.layout.bits)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl GpuLinear {
    /// Uploads a dense `[out, inp]` f32 matrix.
    pub fn dense(gpu: &Arc<Gpu>, w: &[f32], out: usize, inp: usize, bias: Option<&[f32]>) -> Result<Self> {
        Self::dense_limited(gpu, w, out, inp, bias, gpu.max_binding)
    }

    fn dense_limited(
        gpu: &Arc<Gpu>,
        w: &[f32],
        out: usize,
        inp: usize,
        bias: Option<&[f32]>,
        limit: u64,
    ) -> Result<Self> {
        let row_bytes = inp * 4;
        let chunks = split_rows(limit, out, row_bytes, "dense", |r0, r1| {
            (bytemuck::cast_slice(&w[r0 * inp..r1 * inp]).to_vec(), Vec::new(), Vec::new())
        })?;
        let layout = Layout { bits: 32, kind: 0, groups: 1, group_len: inp as u32, row_words: 0, has_zp: false };
        Self::finish(gpu, chunks, bias, out, inp, layout, limit)
    }

    /// Uploads a quantized matrix in its packed layout, as stored in the bundle.
    pub fn packed(gpu: &Arc<Gpu>, q: &Quantized, bias: Option<&[f32]>) -> Result<Self> {
        Self::packed_limited(gpu, q, bias, gpu.max_binding)
    }

    fn packed_limited(gpu: &Arc<Gpu>, q: &Quantized, bias: Option<&[f32]>, limit: u64) -> Result<Self> {
        let s = &q.scheme;
        let (out, inp) = (q.rows, q.cols);
        let row_bytes = s.packed_row_bytes(inp);
        let groups = s.groups(inp);
        let chunks = split_rows(limit, out, row_bytes, "packed", |r0, r1| {
            let zp = q
                .zero_point
                .as_ref()
                .map(|z| z[r0 * groups..r1 * groups].iter().map(|&v| i32::from(v)).collect())
                .unwrap_or_default();
            (q.packed[r0 * row_bytes..r1 * row_bytes].to_vec(), q.scale[r0 * groups..r1 * groups].to_vec(), zp)
        })?;
        let row_words = (row_bytes / 4) as u32;
        let layout = Layout {
            bits: u32::from(s.bits),
            kind: match s.kind {
                mcompress_format::QKind::Int => 0,
                mcompress_format::QKind::Fp8 { .. } => 1,
                mcompress_format::QKind::Fp4 { .. } => 2,
            },
            groups: groups as u32,
            group_len: s.group_len(inp) as u32,
            row_words,
            has_zp: q.zero_point.is_some(),
        };
        Self::finish(gpu, chunks, bias, out, inp, layout, limit)
    }

    fn finish(
        gpu: &Arc<Gpu>,
        parts: Vec<Part>,
        bias: Option<&[f32]>,
        out: usize,
        inp: usize,
        layout: Layout,
        limit: u64,
    ) -> Result<Self> {
        let chunks = parts
            .into_iter()
            .map(|(row0, rows, w, scale, zp)| Chunk {
                row0,
                rows,
                w: gpu.storage("w", &w),
                scale: gpu.storage("scale", bytemuck::cast_slice(&scale)),
                zp: gpu.storage("zp", bytemuck::cast_slice(&zp)),
                bias: gpu.storage("bias", bias.map_or(&[][..], |b| bytemuck::cast_slice(&b[row0..row0 + rows]))),
            })
            .collect();
        gpu.check().map_err(Error::Backend)?;
        Ok(GpuLinear { gpu: Arc::clone(gpu), chunks, out, inp, layout, has_bias: bias.is_some(), limit })
    }

    /// The device the weights live on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// `x [n, inp] · Wᵀ (+ b)` → `[n, out]`, computed on the device.
    pub fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (k, m) = (self.inp, self.out);
        let n = x.len() / k;
        let mut y = vec![0f32; n * m];
        // Input rows per submission: the output and input slices must each fit one binding.
        let max = (self.limit / 4) as usize;
        let per_call = (max / m.max(1)).min(max / k.max(1)).clamp(1, 1 << 16);
        for (x_rows, y_rows) in x.chunks(per_call * k).zip(y.chunks_mut(per_call * m)) {
            self.apply_rows(x_rows, y_rows)?;
        }
        Ok(y)
    }

    fn apply_rows(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let gpu = &*self.gpu;
        let (k, m) = (self.inp, self.out);
        let n = x.len() / k;
        let xb = gpu.storage("x", bytemuck::cast_slice(x));
        let y_bytes = (y.len() * 4) as u64;
        let yb = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("y"),
            size: y_bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("y staging"),
            size: y_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("matmul") });
        let mut uniforms = Vec::new();
        let mut groups = Vec::new();
        for c in &self.chunks {
            let params = Params {
                n: n as u32,
                k: k as u32,
                m: c.rows as u32,
                bits: self.layout.bits,
                kind: self.layout.kind,
                groups: self.layout.groups,
                group_len: self.layout.group_len,
                row_words: self.layout.row_words,
                has_zp: u32::from(self.layout.has_zp),
                has_bias: u32::from(self.has_bias),
                out_stride: m as u32,
                col0: c.row0 as u32,
            };
            let u = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let bg = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("matmul"),
                layout: &gpu.layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: u.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: xb.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 2, resource: c.w.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 3, resource: c.scale.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 4, resource: c.zp.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 5, resource: c.bias.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 6, resource: yb.as_entire_binding() },
                ],
            });
            uniforms.push(u);
            groups.push((bg, c.rows));
        }
        {
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("matmul"), timestamp_writes: None });
            pass.set_pipeline(&gpu.pipeline);
            for (bg, rows) in &groups {
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(rows.div_ceil(64) as u32, n.div_ceil(64) as u32, 1);
            }
        }
        enc.copy_buffer_to_buffer(&yb, 0, &staging, 0, y_bytes);
        gpu.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Backend(format!("wgpu ({}): {e}", gpu.info.name)))?;
        gpu.check().map_err(Error::Backend)?;
        rx.recv()
            .map_err(|e| Error::Backend(format!("wgpu ({}): read-back: {e}", gpu.info.name)))?
            .map_err(|e| Error::Backend(format!("wgpu ({}): read-back: {e}", gpu.info.name)))?;
        {
            let view = slice.get_mapped_range();
            y.copy_from_slice(bytemuck::cast_slice(
                &view.map_err(|e| Error::Backend(format!("wgpu ({}): read-back: {e}", gpu.info.name)))?,
            ));
        }
        staging.unmap();
        Ok(())
    }
}

type Part = (usize, usize, Vec<u8>, Vec<f32>, Vec<i32>);

/// Splits `rows` into chunks whose weight bytes fit one storage binding (rows kept whole).
fn split_rows(
    limit: u64,
    rows: usize,
    row_bytes: usize,
    what: &str,
    mut part: impl FnMut(usize, usize) -> (Vec<u8>, Vec<f32>, Vec<i32>),
) -> Result<Vec<Part>> {
    let per = (limit as usize / row_bytes.max(1)).min(rows.max(1));
    if per == 0 {
        return Err(Error::Backend(format!(
            "{what} matrix row of {row_bytes} bytes exceeds the adapter's {limit} byte storage binding"
        )));
    }
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + per).min(rows);
        let (w, s, z) = part(r0, r1);
        out.push((r0, r1 - r0, w, s, z));
        r0 = r1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg;
    use crate::linear::testing::{cases, quantized, values};

    /// The device, or `None` (test skipped) where no adapter exists and CI did not ask for one.
    pub(crate) fn gpu_or_skip() -> Option<Arc<Gpu>> {
        match device() {
            Ok(g) => Some(g),
            Err(e) if std::env::var_os("MCOMPRESS_REQUIRE_WGPU").is_none() => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("skipping wgpu test: {e}");
                }
                None
            }
            Err(e) => panic!("MCOMPRESS_REQUIRE_WGPU is set but {e}"),
        }
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 2e-5 * scale, "{what}: y[{i}] gpu {a} vs cpu {b}");
        }
    }

    #[test]
    fn test_fused_kernel_matches_cpu_for_every_scheme() {
        let Some(gpu) = gpu_or_skip() else { return };
        // Rows and columns that are not multiples of the 16 × 64 tile or of a packed word.
        let (n, rows) = (19, 70);
        let bias = values(rows, 12);
        for (s, cols) in cases(100) {
            let x = values(n * cols, 11);
            let q = quantized(&s, rows, cols, 13);
            let want = linalg::linear(&x, &q.dequantize(), Some(&bias), cols, rows);
            let got = GpuLinear::packed(&gpu, &q, Some(&bias)).unwrap().apply(&x).unwrap();
            close(&got, &want, &s.label());
        }
        let cols = 100;
        let x = values(n * cols, 11);
        let w = values(rows * cols, 14);
        let got = GpuLinear::dense(&gpu, &w, rows, cols, None).unwrap().apply(&x).unwrap();
        close(&got, &linalg::linear(&x, &w, None, cols, rows), "dense f32");
    }

    #[test]
    fn test_matrices_and_calls_split_to_fit_the_binding_limit() {
        let Some(gpu) = gpu_or_skip() else { return };
        let (n, rows, cols) = (33, 50, 64);
        let x = values(n * cols, 21);
        // 1 KiB per binding: weights in chunks of a few rows, inputs in chunks of a few rows.
        let limit = 1024;
        let q = quantized(&mcompress_format::quant::QScheme::int(4, 32, false), rows, cols, 22);
        let lin = GpuLinear::packed_limited(&gpu, &q, None, limit).unwrap();
        assert!(lin.chunks.len() > 1);
        close(&lin.apply(&x).unwrap(), &linalg::linear(&x, &q.dequantize(), None, cols, rows), "packed, split");
        let w = values(rows * cols, 23);
        let lin = GpuLinear::dense_limited(&gpu, &w, rows, cols, None, limit).unwrap();
        assert_eq!(lin.chunks.len(), 13, "4 rows of 256 bytes per chunk");
        close(&lin.apply(&x).unwrap(), &linalg::linear(&x, &w, None, cols, rows), "dense, split");
        // A row wider than a binding is refused with a clear error, not a device fault.
        let err = GpuLinear::dense_limited(&gpu, &w, rows, cols, None, 128).unwrap_err().to_string();
        assert!(err.contains("exceeds the adapter's 128 byte storage binding"), "{err}");
    }
}
