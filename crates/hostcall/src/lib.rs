//! The proxy-wasm hostcalls market-router needs answered with a status where the SDK's
//! (`proxy_wasm::hostcalls`, 0.2.5) panic, and a panic kills the VM for every request on the
//! worker. The only crate of the filter that holds `unsafe` code: one raw call of the
//! proxy-wasm ABI, read the way the SDK reads it.
//!
//! `get_buffer`: the SDK panics on any status but Ok and NotFound. Kong's wasm host answers
//! BadArgument for the body of a dispatched call whose connection closed before the body it
//! announced was complete (it reports such a call as finished, with the announced size).

#[cfg(target_arch = "wasm32")]
mod abi {
    extern "C" {
        // The proxy-wasm ABI 0.2.1 import, as the SDK declares it (buffer type and status are
        // `repr(u32)` there).
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
    }
}

/// The ABI's Ok status.
pub const STATUS_OK: u32 = 0;
/// The ABI's NotFound status.
pub const STATUS_NOT_FOUND: u32 = 1;
/// What [`get_buffer`] answers where there is no proxy-wasm host (native builds).
pub const STATUS_NO_HOST: u32 = u32::MAX;

/// Up to `max_size` bytes of buffer `buffer_type` (the ABI's numbering) from byte `start`:
/// `Ok(None)` when the host has no such buffer (NotFound) or answers no bytes, `Err(status)`
/// for any other status (the SDK panics there).
pub fn get_buffer(buffer_type: u32, start: usize, max_size: usize) -> Result<Option<Vec<u8>>, u32> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut data: *mut u8 = core::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes to the two locals given, and on Ok hands over `size` bytes
        // at `data` that it allocated through the module's `proxy_on_memory_allocate` (the
        // SDK's export: a `Vec<u8>` of that capacity from this module's global allocator,
        // leaked to the host), so the Vec is rebuilt with `size` as length and capacity,
        // exactly as the SDK's own `get_buffer` does. On any other status nothing is handed
        // over.
        let status = unsafe {
            abi::proxy_get_buffer_bytes(buffer_type, start, max_size, &mut data, &mut size)
        };
        match status {
            STATUS_OK if data.is_null() => Ok(None),
            // SAFETY: see above.
            STATUS_OK => Ok(Some(unsafe { Vec::from_raw_parts(data, size, size) })),
            STATUS_NOT_FOUND => Ok(None),
            s => Err(s),
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (buffer_type, start, max_size);
        Err(STATUS_NO_HOST)
    }
}
