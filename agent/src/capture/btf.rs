//! The one fact the fast path's verdict needs from the kernel's BTF: where `cb` lies in
//! `struct sk_buff`. aya parses BTF but keeps its type walk private, and the format's type section
//! is simple enough to walk here.
use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Format(&'static str),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
}

/// The byte offset of `member` in the kernel's `struct strukt`.
pub fn kernel_member_offset(strukt: &str, member: &str) -> Result<u32, BtfError> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    member_offset(&data, strukt, member)
}

/// The byte offset of `member` in `struct strukt`, in a little-endian BTF blob.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    let u16_at = |o: usize| btf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        btf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let short = BtfError::Format("truncated");
    if u16_at(0) != Some(MAGIC) {
        return Err(BtfError::Format("bad magic (or not little-endian)"));
    }
    let hdr_len = u32_at(4).ok_or(BtfError::Format("truncated"))? as usize;
    let (type_off, type_len, str_off) = match (u32_at(8), u32_at(12), u32_at(16)) {
        (Some(a), Some(b), Some(c)) => (a as usize, b as usize, c as usize),
        _ => return Err(short),
    };
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |off: u32| -> Option<&[u8]> {
        let start = strings + off as usize;
        let rest = btf.get(start..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    };
    let mut at = types;
    let end = types + type_len;
    while at < end {
        let (Some(name_off), Some(info)) = (u32_at(at), u32_at(at + 4)) else {
            return Err(BtfError::Format("truncated"));
        };
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let body = at + 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // int, var, decl tag
            3 => 12,                      // array
            4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
            6 | 13 => 8 * vlen,           // enum, func proto
            2 | 7..=12 | 16 | 18 => 0,    // ptr, fwd, typedef, qualifiers, func, float, type tag
            _ => return Err(BtfError::Format("unknown type kind")),
        };
        if kind == KIND_STRUCT && name(name_off) == Some(strukt.as_bytes()) {
            for i in 0..vlen {
                let m = body + 12 * i;
                let (Some(m_name), Some(m_off)) = (u32_at(m), u32_at(m + 8)) else {
                    return Err(BtfError::Format("truncated"));
                };
                if name(m_name) == Some(member.as_bytes()) {
                    // With kind_flag set the low 24 bits are the bit offset (the rest a bitfield size).
                    let bits = if kind_flag {
                        m_off & 0x00ff_ffff
                    } else {
                        m_off
                    };
                    return Ok(bits / 8);
                }
            }
            return Err(BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            });
        }
        at = body + extra;
    }
    Err(BtfError::NoStruct(strukt.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: an int, then `struct pair { int a; int b; }` with `b` at byte 4.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0";
        let mut types = Vec::new();
        let push = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        // [1] int: name "int", kind 1, size 4, then its encoding word.
        push(&mut types, 1);
        push(&mut types, 1 << 24);
        push(&mut types, 4);
        push(&mut types, 32);
        // [2] struct pair, 2 members, size 8.
        push(&mut types, 5);
        push(&mut types, (4 << 24) | 2);
        push(&mut types, 8);
        for (name, bits) in [(10u32, 0u32), (12, 32)] {
            push(&mut types, name);
            push(&mut types, 1);
            push(&mut types, bits);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        push(&mut out, 24);
        push(&mut out, 0);
        push(&mut out, types.len() as u32);
        push(&mut out, types.len() as u32);
        push(&mut out, strings.len() as u32);
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn a_member_offset_is_found_in_bytes_and_absent_names_are_errors() {
        let b = blob();
        assert_eq!(member_offset(&b, "pair", "b").unwrap(), 4);
        assert_eq!(member_offset(&b, "pair", "a").unwrap(), 0);
        assert!(matches!(
            member_offset(&b, "pair", "c"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            member_offset(&b, "other", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            member_offset(&b[..20], "pair", "a"),
            Err(BtfError::Format(_))
        ));
        assert!(matches!(
            member_offset(b"garbage!", "pair", "a"),
            Err(BtfError::Format(_))
        ));
    }

    #[test]
    fn this_kernel_has_sk_buff_cb_where_its_btf_says() {
        // The offset itself varies by kernel; that it is found and plausible is what matters.
        let off =
            kernel_member_offset("sk_buff", "cb").expect("sk_buff.cb in /sys/kernel/btf/vmlinux");
        assert!((16..256).contains(&off), "sk_buff.cb at {off}");
    }
}
