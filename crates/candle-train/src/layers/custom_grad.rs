//! Ops with a hand-written backward, attached to Candle's autograd through custom ops.
//!
//! Candle keeps every op's output alive until the whole graph is dropped, so a layer built from
//! many small ops keeps all its intermediates (a layer norm computed in F32 keeps five F32
//! copies of its input). Here the forward runs on detached tensors, its intermediates are freed
//! at once, and only the result (plus the op's inputs, which Candle holds, and whatever small
//! statistics the backward needs) stays in the graph. The backward is written with tensor ops,
//! so it runs on every device, and it reduces in F32 even for half-precision tensors (Candle's
//! CPU sums of BF16/F16 accumulate in the half type).

use std::sync::Mutex;

use candle::backend::BackendStorage;
use candle::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};

type Bwd1 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
type Bwd2 =
    Box<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync>;
type Bwd3 = Box<
    dyn Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;

/// The precomputed result, handed over (copied once) by the op's forward and then released.
struct Value(Mutex<Option<Tensor>>);

impl Value {
    fn new(value: Tensor) -> Result<Self> {
        // A fresh contiguous tensor whose storage holds exactly its elements.
        let value =
            if value.is_contiguous() && value.layout().start_offset() == 0 { value } else { value.copy()? };
        Ok(Self(Mutex::new(Some(value))))
    }

    fn take(&self, name: &str) -> Result<Tensor> {
        let taken = self.0.lock().map_err(|_| candle::Error::Msg(format!("{name}: poisoned lock")))?.take();
        taken.ok_or_else(|| candle::Error::Msg(format!("{name}: forward ran twice")))
    }

    fn cpu(&self, name: &str) -> Result<(CpuStorage, Shape)> {
        let value = self.take(name)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
            _ => candle::bail!("{name}: result is not on the CPU"),
        }
    }

    fn cuda(&self, name: &str) -> Result<(CudaStorage, Shape)> {
        let value = self.take(name)?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, value.shape().clone())),
            _ => candle::bail!("{name}: result is not on a CUDA device"),
        }
    }
}

struct Op1 {
    name: &'static str,
    value: Value,
    bwd: Bwd1,
}

impl CustomOp1 for Op1 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name)
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(arg, res, grad)
    }
}

struct Op2 {
    name: &'static str,
    value: Value,
    bwd: Bwd2,
}

impl CustomOp2 for Op2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, res, grad)
    }
}

struct Op3 {
    name: &'static str,
    value: Value,
    bwd: Bwd3,
}

impl CustomOp3 for Op3 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, c, res, grad)
    }
}

/// `value` (computed from `arg` without a graph) as the output of an op on `arg` whose backward
/// is `bwd(arg, output, grad_output)`. Without a graph to join (`arg` tracks no gradient),
/// `value` is returned as it is.
pub fn custom1(
    name: &'static str,
    arg: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !arg.track_op() {
        return Ok(value);
    }
    arg.apply_op1(Op1 { name, value: Value::new(value)?, bwd: Box::new(bwd) })
}

/// As [`custom1`], for an op of two arguments.
pub fn custom2(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(value);
    }
    a.apply_op2(b, Op2 { name, value: Value::new(value)?, bwd: Box::new(bwd) })
}

/// As [`custom1`], for an op of three arguments.
pub fn custom3(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: Tensor,
    bwd: impl Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(value);
    }
    a.apply_op3(b, c, Op3 { name, value: Value::new(value)?, bwd: Box::new(bwd) })
}
