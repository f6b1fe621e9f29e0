//! A stream entry's fields in one buffer: each name and value as a 4-byte little-endian
//! length and its bytes. A read of a thousand entries of a few fields each would otherwise
//! be some ten thousand small allocations, made by the reader thread and freed by the main
//! thread; this is one per entry, written straight from the socket's buffer.

/// An entry's field names and values, in the order Redis gave them (a name may repeat).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Fields {
    packed: Vec<u8>,
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| {
                (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned())
            }))
            .finish()
    }
}

impl Fields {
    pub fn with_capacity(bytes: usize) -> Fields {
        Fields { packed: Vec::with_capacity(bytes) }
    }

    /// The fields of `pairs`, in their order.
    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Fields {
        let size = pairs.iter().map(|(n, v)| 8 + n.as_ref().len() + v.as_ref().len()).sum();
        let mut f = Fields::with_capacity(size);
        for (n, v) in pairs {
            f.push_part(n.as_ref());
            f.push_part(v.as_ref());
        }
        f
    }

    /// Appends one name or value (names and values alternate, a name first).
    pub fn push_part(&mut self, part: &[u8]) {
        self.packed.extend_from_slice(&(part.len() as u32).to_le_bytes());
        self.packed.extend_from_slice(part);
    }

    /// Starts a part of `len` bytes, to be filled by [`Fields::extend_part`].
    pub fn begin_part(&mut self, len: u32) {
        // (Grown as the bytes come beyond 1 MiB: a wrong length asks for no memory up front.)
        self.packed.reserve(4 + (len as usize).min(1 << 20));
        self.packed.extend_from_slice(&len.to_le_bytes());
    }

    /// Appends bytes of the part begun last.
    pub fn extend_part(&mut self, bytes: &[u8]) {
        self.packed.extend_from_slice(bytes);
    }

    /// The size of the buffer, in bytes.
    pub fn bytes(&self) -> usize {
        self.packed.len()
    }

    /// The (name, value) pairs in order; a name without a value (never made here) is left
    /// out.
    pub fn iter(&self) -> FieldIter<'_> {
        FieldIter { rest: &self.packed }
    }

    /// The pairs gathered, for what needs a slice (the JSON text of an entry).
    pub fn pairs(&self) -> Vec<(&[u8], &[u8])> {
        self.iter().collect()
    }

    /// The first value of field `name` (Redis allows a name twice in one entry; the first
    /// counts, as for a hash field).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

pub struct FieldIter<'a> {
    rest: &'a [u8],
}

impl<'a> FieldIter<'a> {
    fn part(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        let (part, rest) = rest.split_at(len);
        self.rest = rest;
        Some(part)
    }
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let name = self.part()?;
        let value = self.part()?;
        Some((name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_order_repeats_and_empty_parts() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b"a", b"1"), (b"", b""), (b"a", b"2"), (b"\0\xff", b"x\r\n")];
        let f = Fields::from_pairs(&pairs);
        assert_eq!(f.pairs(), pairs);
        assert_eq!(f.get(b"a"), Some(&b"1"[..]));
        assert_eq!(f.get(b""), Some(&b""[..]));
        assert_eq!(f.get(b"b"), None);
        assert!(Fields::default().pairs().is_empty());
    }

    #[test]
    fn a_part_written_in_pieces_is_one_part() {
        let mut f = Fields::default();
        f.begin_part(5);
        f.extend_part(b"he");
        f.extend_part(b"llo");
        f.push_part(b"v");
        assert_eq!(f.pairs(), vec![(&b"hello"[..], &b"v"[..])]);
    }
}
