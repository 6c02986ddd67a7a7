//! Byte-level helpers shared by the mesh codecs: the length-prefixed [`FrameCodec`] for the TCP
//! stream, and a bounds-checked [`Reader`] so no decoder can index past its input.

/// Largest post-handshake frame body (as Weave: 10 MiB).
pub const MAX_FRAME_LEN: usize = 10 << 20;
/// Bytes of the big-endian length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Splits a TCP byte stream into frames `[u32 BE length][body]`. Buffers partial input, rejects a
/// declared length above the cap as soon as the 4 length bytes are in (before buffering the body),
/// and never panics.
#[derive(Debug)]
pub struct FrameCodec {
    buf: Vec<u8>,
    max: usize,
}

impl FrameCodec {
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec {
            buf: Vec::new(),
            max: max_frame_len,
        }
    }

    pub fn max_frame_len(&self) -> usize {
        self.max
    }

    pub fn set_max_frame_len(&mut self, max: usize) {
        self.max = max;
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let end = FRAME_HEADER_LEN + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let body = self
            .buf
            .get(FRAME_HEADER_LEN..end)
            .unwrap_or_default()
            .to_vec();
        self.buf.drain(..end);
        Ok(Some(body))
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Give up the buffered bytes (handing the stream over to the next layer).
    pub fn into_remaining(self) -> Vec<u8> {
        self.buf
    }

    /// Append `[len][body]` to `out`. Errors if the body exceeds `max`.
    pub fn encode(body: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
        if body.len() > max {
            return Err(FrameError::TooLarge {
                len: body.len(),
                max,
            });
        }
        // body.len() <= max <= u32::MAX in practice; saturate rather than wrap otherwise.
        let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
            len: body.len(),
            max,
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        Ok(())
    }
}

/// Error of a short or malformed read; decoders map it to their own error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unexpected end of input")]
pub struct UnexpectedEnd;

/// A bounds-checked cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], UnexpectedEnd> {
        if n > self.buf.len() {
            return Err(UnexpectedEnd);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], UnexpectedEnd> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, UnexpectedEnd> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, UnexpectedEnd> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, UnexpectedEnd> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, UnexpectedEnd> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string with a one-byte length prefix.
    pub fn short_str(&mut self) -> Result<&'a str, UnexpectedEnd> {
        let n = self.u8()?;
        let b = self.bytes(usize::from(n))?;
        std::str::from_utf8(b).map_err(|_| UnexpectedEnd)
    }

    /// A byte string with a four-byte length prefix, capped by what is left.
    pub fn long_bytes(&mut self) -> Result<&'a [u8], UnexpectedEnd> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

/// Append a string with a one-byte length prefix, truncated to 255 bytes at a char boundary.
pub fn put_short_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let t = s.get(..end).unwrap_or_default();
    out.push(t.len() as u8);
    out.extend_from_slice(t.as_bytes());
}

/// Append a byte string with a four-byte length prefix.
pub fn put_long_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_split_and_cap() {
        let mut out = Vec::new();
        FrameCodec::encode(b"hello", 100, &mut out).unwrap();
        FrameCodec::encode(b"", 100, &mut out).unwrap();
        let mut c = FrameCodec::new(100);
        for b in &out {
            c.push(std::slice::from_ref(b));
        }
        assert_eq!(c.next_frame().unwrap().unwrap(), b"hello");
        assert_eq!(c.next_frame().unwrap().unwrap(), b"");
        assert_eq!(c.next_frame().unwrap(), None);
        c.push(&[0, 0, 1, 0]);
        assert_eq!(
            c.next_frame(),
            Err(FrameError::TooLarge { len: 256, max: 100 })
        );
        assert!(FrameCodec::encode(&[0; 101], 100, &mut out).is_err());
    }

    proptest! {
        #[test]
        fn codec_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut c = FrameCodec::new(32);
            for ch in chunks {
                c.push(&ch);
                while let Ok(Some(_)) = c.next_frame() {}
            }
        }

        #[test]
        fn reader_never_panics(b in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut r = Reader::new(&b);
            let _ = r.short_str();
            let _ = r.long_bytes();
            let _ = r.u64();
            let _ = r.array::<7>();
        }
    }
}
