//! f32 activations the CPU mixer reads on the host: a Vec it owns, or the storage of a
//! contiguous CPU tensor borrowed in place. Reading a tensor back with `to_vec1` copies
//! it (for in_proj's output, 12 KiB per token and layer of a 130m model), and the copy
//! and the fresh pages it touched were ~5% of a CPU prefill.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use std::ops::Deref;

/// The elements of `t` copied out as f32 (any dtype, layout or device).
pub(crate) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[derive(Debug)]
pub(crate) enum HostF32 {
    Owned(Vec<f32>),
    /// A contiguous f32 tensor on the CPU (checked when made).
    Borrowed(Tensor),
}

impl Default for HostF32 {
    fn default() -> Self {
        Self::Owned(Vec::new())
    }
}

impl HostF32 {
    /// `t` itself when it is a contiguous f32 CPU tensor, else its elements copied out
    /// as f32.
    pub(crate) fn of(t: Tensor) -> Result<Self> {
        if t.dtype() == DType::F32 && t.is_contiguous() && matches!(t.device(), Device::Cpu) {
            return Ok(Self::Borrowed(t));
        }
        Ok(Self::Owned(to_vec_f32(&t)?))
    }

    /// The elements, readable while the view lives.
    pub(crate) fn view(&self) -> Result<F32View<'_>> {
        match self {
            Self::Owned(v) => Ok(F32View::Owned(v)),
            Self::Borrowed(t) => {
                let (storage, layout) = t.storage_and_layout();
                let (start, len) = (layout.start_offset(), layout.shape().elem_count());
                match &*storage {
                    Storage::Cpu(CpuStorage::F32(v)) if start + len <= v.len() => {}
                    _ => bail!("internal: a borrowed host activation is not f32 CPU storage"),
                }
                Ok(F32View::Borrowed {
                    storage: Box::new(storage),
                    start,
                    len,
                })
            }
        }
    }

    /// Appends `rows` to an owned buffer (a gather of kept tokens builds one).
    pub(crate) fn extend_from_slice(&mut self, rows: &[f32]) -> Result<()> {
        match self {
            Self::Owned(v) => {
                v.extend_from_slice(rows);
                Ok(())
            }
            Self::Borrowed(_) => bail!("internal: cannot append to a borrowed host activation"),
        }
    }
}

/// A read view of a [`HostF32`]: the tensor's storage stays read-locked while it lives
/// (candle's lock guard, boxed: its type is candle's choice of lock).
pub(crate) enum F32View<'a> {
    Owned(&'a [f32]),
    Borrowed {
        storage: Box<dyn Deref<Target = Storage> + 'a>,
        start: usize,
        len: usize,
    },
}

impl Deref for F32View<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            F32View::Owned(v) => v,
            F32View::Borrowed {
                storage,
                start,
                len,
            } => match &***storage {
                Storage::Cpu(CpuStorage::F32(v)) => &v[*start..*start + *len],
                // `view` checked the storage; it cannot change while the guard is held.
                _ => &[],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_contiguous_f32_and_copies_the_rest() -> Result<()> {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((3, 4))?;
        let b = HostF32::of(t.clone())?;
        assert!(matches!(b, HostF32::Borrowed(_)));
        assert_eq!(&*b.view()?, t.flatten_all()?.to_vec1::<f32>()?.as_slice());
        // A narrowed (offset) contiguous view is borrowed at its offset.
        let rows = t.narrow(0, 1, 2)?;
        let r = HostF32::of(rows)?;
        assert!(matches!(r, HostF32::Borrowed(_)));
        assert_eq!(&*r.view()?, &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        // Strided and non-f32 tensors are copied out as f32.
        let s = HostF32::of(t.t()?)?;
        assert!(matches!(s, HostF32::Owned(_)));
        assert_eq!(&s.view()?[..3], &[0.0, 4.0, 8.0]);
        let h = HostF32::of(t.to_dtype(DType::BF16)?)?;
        assert!(matches!(h, HostF32::Owned(_)));
        assert_eq!(h.view()?.len(), 12);
        let mut o = HostF32::default();
        o.extend_from_slice(&[1.0, 2.0])?;
        assert_eq!(&*o.view()?, &[1.0, 2.0]);
        let mut borrowed = HostF32::of(t)?;
        assert!(borrowed.extend_from_slice(&[0.0]).is_err());
        Ok(())
    }
}
