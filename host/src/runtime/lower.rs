//! Copying a [`Message`] into guest memory for `handle`: the canonical ABI's lowering of the
//! contract's `message` record, written out by hand for the one call every message makes.
//!
//! `message` flattens to 18 core values, more than the 16 a call passes as arguments, so the
//! record goes through guest memory: wasmtime asks the guest's `cabi_realloc` for the record's
//! area, and then lowers every field. The lowering derived by `bindgen!` looks the guest's memory
//! up again for each field it writes (about 30 per message); this one looks it up once per
//! buffer it copies and once for the record, and makes the same `cabi_realloc` calls (sizes,
//! alignments, order) as the derived lowering does (about 60 ns less per invocation; see
//! docs/PERFORMANCE.md).
//!
//! The type, its size and its alignment are the derived ones ([`Lowered`] delegates
//! `ComponentType` to [`Message`]), so a component whose `message` differs from the contract's
//! is refused by the same type check as before. A component that asks for strings in an
//! encoding other than UTF-8 gets the derived lowering.
//!
//! Owns the record's memory layout in the 0.1 contract, checked against the derived ABI at
//! compile time. Knows nothing of where messages come from or what the handler does.

use std::mem::MaybeUninit;

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};

use super::invocation::{Header, Message};

/// Offsets of `message`'s fields in its canonical-ABI layout (strings and lists are a
/// `(pointer, length)` pair of u32s; an option is a discriminant byte, then its payload at the
/// payload's alignment).
mod at {
    pub const ID: usize = 0;
    pub const TOPIC: usize = 8;
    pub const PARTITION: usize = 16;
    pub const OFFSET: usize = 24;
    pub const KEY: usize = 32;
    pub const KEY_VALUE: usize = 36;
    pub const PAYLOAD: usize = 44;
    pub const HEADERS: usize = 52;
    pub const TIMESTAMP: usize = 64;
    pub const TIMESTAMP_VALUE: usize = 72;
    pub const TENANT: usize = 80;
    pub const ATTEMPT: usize = 88;
    /// The record's size.
    pub const END: usize = 96;
    /// `header`'s size; its `key` is at 0, its `value` at 8.
    pub const HEADER: usize = 16;
}

// The layout above must be the one wasmtime derives from the contract.
const _: () = {
    assert!(<Message as ComponentType>::SIZE32 == at::END);
    assert!(<Message as ComponentType>::ALIGN32 == 8);
    assert!(<Header as ComponentType>::SIZE32 == at::HEADER);
    assert!(<Header as ComponentType>::ALIGN32 == 4);
};

/// The longest UTF-8 string the canonical ABI can pass (its lengths are 31 bits); a byte list
/// is bounded by its 32-bit length.
const MAX_STRING_LENGTH: usize = (1 << 31) - 1;
const MAX_LIST_LENGTH: usize = u32::MAX as usize;

/// A message as `handle`'s argument: lowered by hand, typed as the contract's `message`.
#[derive(Clone, Copy)]
pub(crate) struct Lowered<'a>(pub(crate) &'a Message);

#[allow(unsafe_code)]
// SAFETY: every item is `Message`'s own, so the type, the flat representation and the memory
// layout are exactly those of the record `bindgen!` derived from the contract.
unsafe impl ComponentType for Lowered<'_> {
    type Lower = <Message as ComponentType>::Lower;

    const ABI: CanonicalAbiInfo = <Message as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <Message as ComponentType>::typecheck(ty, types)
    }
}

#[allow(unsafe_code)]
// SAFETY: `linear_lower_to_memory` writes exactly the record's 96 bytes at `offset`, in the
// layout checked against the derived ABI above; every pointer it writes is one the guest's
// `cabi_realloc` returned for that many bytes, which `LowerContext::realloc` has checked lies
// inside the guest's memory.
unsafe impl Lower for Lowered<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        // Only reached if the record fitted in 16 flat values; it does not, but the derived
        // lowering is correct either way.
        self.0.linear_lower_to_flat(cx, ty, dst)
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        if !matches!(cx.options().string_encoding, StringEncoding::Utf8) {
            return self.0.linear_lower_to_memory(cx, ty, offset);
        }
        let message = self.0;
        // The buffers first, in the field order the canonical ABI calls `cabi_realloc` in.
        let id = string_in(cx, &message.id)?;
        let topic = string_in(cx, &message.topic)?;
        let key = match &message.key {
            Some(key) => Some(copy_in(cx, key, MAX_LIST_LENGTH)?),
            None => None,
        };
        let payload = copy_in(cx, &message.payload, MAX_LIST_LENGTH)?;
        let headers = headers_in(cx, &message.headers)?;
        let tenant = string_in(cx, &message.tenant)?;

        // Then the record, in one piece of memory.
        let record = guest_slice(cx, offset, at::END)?;
        put_pair(record, at::ID, id);
        put_pair(record, at::TOPIC, topic);
        put(record, at::PARTITION, message.partition.to_le_bytes());
        put(record, at::OFFSET, message.offset.to_le_bytes());
        match key {
            Some(key) => {
                record[at::KEY] = 1;
                put_pair(record, at::KEY_VALUE, key);
            }
            None => record[at::KEY] = 0,
        }
        put_pair(record, at::PAYLOAD, payload);
        put_pair(record, at::HEADERS, headers);
        match message.timestamp_ms {
            Some(ms) => {
                record[at::TIMESTAMP] = 1;
                put(record, at::TIMESTAMP_VALUE, ms.to_le_bytes());
            }
            None => record[at::TIMESTAMP] = 0,
        }
        put_pair(record, at::TENANT, tenant);
        put(record, at::ATTEMPT, message.attempt.to_le_bytes());
        Ok(())
    }
}

/// A buffer in guest memory: its address and its length.
type Pair = (u32, u32);

/// Lower a UTF-8 string (the encoding checked by the caller).
fn string_in<T>(cx: &mut LowerContext<'_, T>, string: &str) -> wasmtime::Result<Pair> {
    copy_in(cx, string.as_bytes(), MAX_STRING_LENGTH)
}

/// Allocate `bytes.len()` bytes through the guest's `cabi_realloc` (alignment 1: a UTF-8
/// string or a `list<u8>`) and copy `bytes` there.
fn copy_in<T>(cx: &mut LowerContext<'_, T>, bytes: &[u8], max: usize) -> wasmtime::Result<Pair> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|_| bytes.len() <= max)
        .ok_or_else(|| {
            wasmtime::format_err!(
                "a message field of {} bytes is too large to copy into wasm",
                bytes.len()
            )
        })?;
    let ptr = cx.realloc(0, 0, 1, bytes.len())?;
    if !bytes.is_empty() {
        guest_slice(cx, ptr, bytes.len())?.copy_from_slice(bytes);
    }
    Ok((address(ptr)?, len))
}

/// Lower `list<header>`: the list's area, then each header's key and value, in order.
fn headers_in<T>(cx: &mut LowerContext<'_, T>, headers: &[Header]) -> wasmtime::Result<Pair> {
    let size = headers
        .len()
        .checked_mul(at::HEADER)
        .ok_or_else(|| wasmtime::format_err!("size overflow copying the headers"))?;
    let list = cx.realloc(0, 0, 4, size)?;
    for (i, header) in headers.iter().enumerate() {
        let key = string_in(cx, &header.key)?;
        let value = copy_in(cx, &header.value, MAX_LIST_LENGTH)?;
        let slot = guest_slice(cx, list + i * at::HEADER, at::HEADER)?;
        put_pair(slot, 0, key);
        put_pair(slot, 8, value);
    }
    let len = u32::try_from(headers.len())
        .map_err(|_| wasmtime::format_err!("too many headers to copy into wasm"))?;
    Ok((address(list)?, len))
}

/// `len` bytes of guest memory at `at`. `LowerContext::realloc` has already checked the bounds
/// of what it returned (and memory never shrinks), so the error is for a broken invariant, not
/// a guest's doing.
fn guest_slice<'m, T>(
    cx: &'m mut LowerContext<'_, T>,
    at: usize,
    len: usize,
) -> wasmtime::Result<&'m mut [u8]> {
    cx.as_slice_mut()
        .get_mut(at..)
        .and_then(|memory| memory.get_mut(..len))
        .ok_or_else(|| wasmtime::format_err!("{len} bytes at {at} are out of bounds of memory"))
}

fn address(ptr: usize) -> wasmtime::Result<u32> {
    u32::try_from(ptr).map_err(|_| wasmtime::format_err!("guest address {ptr} is out of range"))
}

fn put_pair(record: &mut [u8], at: usize, (ptr, len): Pair) {
    put(record, at, ptr.to_le_bytes());
    put(record, at + 4, len.to_le_bytes());
}

fn put<const N: usize>(record: &mut [u8], at: usize, bytes: [u8; N]) {
    record[at..at + N].copy_from_slice(&bytes);
}
