//! Reading a fuzz input as a stream of choices, and the PRNG the replay test seeds inputs with.

/// A fuzz input read front to back; past its end every read is zero, so any byte string is a
/// valid (if short) program.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `max` bytes of the input (fewer at its end).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + max).min(self.data.len());
        self.pos = start + max;
        &self.data[start..end]
    }

    /// An index below `n` (`n > 0`), or any u16 one time in eight: out of range on purpose.
    pub fn index(&mut self, n: u16) -> u16 {
        let v = self.u16();
        if v & 0xe000 == 0xe000 {
            v
        } else {
            v % n.max(1)
        }
    }

    /// A guest address: mostly below `span`, sometimes just past it, sometimes anywhere.
    pub fn addr(&mut self, span: u64) -> u64 {
        let sel = self.u8();
        let v = u64::from(self.u32());
        match sel % 16 {
            0 => self.u64(),
            1 => span.wrapping_add(v % 4096),
            2 => u64::MAX - v % 4096,
            _ => v % span.max(1),
        }
    }
}

/// A small deterministic PRNG (xorshift64*) for the replay test's seeded inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64().to_le_bytes()[3]).collect()
    }
}
