//! What the fast path's verdict needs from the running kernel: a release whose stream verdict
//! accounts `copied_seq` as the verdict's repeated-head guard relies on, and three facts from its BTF
//! — where `cb` and `sk` lie in `struct sk_buff`, and where `copied_seq` lies in `struct tcp_sock`.
//! aya parses BTF but keeps its type walk private, and the format's type section is simple enough
//! to walk here.
use std::path::Path;

/// The first release whose `tcp_read_skb` hands buffers over one by one and whose verdict advances
/// `copied_seq` by what is left of each buffer after the program (`tcp_eat_skb`, 6.4; its read loop
/// without sequence tracking, 6.6). On an older one a cut head could be counted whole and the next
/// buffer cut by mistake, losing bytes.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

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
    #[error("Linux {release} is older than {}.{}, the first release the fast path's guard against repeated bytes is built for", MIN_KERNEL.0, MIN_KERNEL.1)]
    OldKernel { release: String },
}

/// Whether kernel `release` (`uname -r`: `6.18.44`, `6.6.0-1-amd64`, …) is at least [`MIN_KERNEL`].
/// One that does not start with `major.minor` is not trusted.
pub fn release_supported(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= MIN_KERNEL,
        _ => false,
    }
}

/// Byte offsets into kernel structures, for reads with `bpf_probe_read_kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbLayout {
    /// `sk_buff.cb`, which opens with `struct tcp_skb_cb` and its `seq`.
    pub cb: u32,
    /// `sk_buff.sk`.
    pub sk: u32,
    /// `tcp_sock.copied_seq`.
    pub copied_seq: u32,
}

impl SkbLayout {
    /// The running kernel's, from `/sys/kernel/btf/vmlinux`, once its release is recent enough.
    pub fn of_kernel() -> Result<Self, BtfError> {
        let release_path = "/proc/sys/kernel/osrelease";
        let release = std::fs::read_to_string(release_path).map_err(|source| BtfError::Read {
            path: release_path.into(),
            source,
        })?;
        let release = release.trim();
        if !release_supported(release) {
            return Err(BtfError::OldKernel {
                release: release.into(),
            });
        }
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_btf(&data)
    }

    pub fn from_btf(btf: &[u8]) -> Result<Self, BtfError> {
        let types = Types::parse(btf)?;
        Ok(Self {
            cb: types.member_offset("sk_buff", "cb")?,
            sk: types.member_offset("sk_buff", "sk")?,
            copied_seq: types.member_offset("tcp_sock", "copied_seq")?,
        })
    }
}

/// The type section of a little-endian BTF blob, indexed by type id.
struct Types<'a> {
    btf: &'a [u8],
    strings: usize,
    /// Where each type's record starts; type ids count from 1.
    records: Vec<usize>,
}

/// One struct or union member: its name's string offset, its type id, and its offset in bits.
struct Member {
    name: u32,
    ty: u32,
    bits: u32,
}

impl<'a> Types<'a> {
    fn parse(btf: &'a [u8]) -> Result<Self, BtfError> {
        let short = || BtfError::Format("truncated");
        let u16_at = |o: usize| btf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Format("bad magic (or not little-endian)"));
        }
        let hdr_len = u32_at(btf, 4).ok_or_else(short)? as usize;
        let (Some(type_off), Some(type_len), Some(str_off)) =
            (u32_at(btf, 8), u32_at(btf, 12), u32_at(btf, 16))
        else {
            return Err(short());
        };
        let start = hdr_len + type_off as usize;
        let end = start + type_len as usize;
        let mut records = Vec::new();
        let mut at = start;
        while at < end {
            let info = u32_at(btf, at + 4).ok_or_else(short)?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func proto
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type tag
                _ => return Err(BtfError::Format("unknown type kind")),
            };
            records.push(at);
            at += 12 + extra;
        }
        if btf.len() < end {
            return Err(short());
        }
        Ok(Self {
            btf,
            strings: hdr_len + str_off as usize,
            records,
        })
    }

    fn name(&self, off: u32) -> Option<&[u8]> {
        let rest = self.btf.get(self.strings + off as usize..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    }

    /// A struct's or union's members, when type `id` is one.
    fn members(&self, id: u32) -> Option<Vec<Member>> {
        let at = *self.records.get((id as usize).checked_sub(1)?)?;
        let info = u32_at(self.btf, at + 4)?;
        let kind = (info >> 24) & 0x1f;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        // With kind_flag set the low 24 bits are the bit offset (the rest a bitfield size).
        let mask = if info >> 31 == 1 { 0x00ff_ffff } else { !0 };
        (0..(info & 0xffff) as usize)
            .map(|i| {
                let m = at + 12 + 12 * i;
                Some(Member {
                    name: u32_at(self.btf, m)?,
                    ty: u32_at(self.btf, m + 4)?,
                    bits: u32_at(self.btf, m + 8)? & mask,
                })
            })
            .collect()
    }

    /// The byte offset of `member` in `struct strukt`, looking into anonymous structs and unions
    /// (`sk_buff.sk` shares one with `ip_defrag_offset`).
    fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = (1..=self.records.len() as u32)
            .find(|&id| {
                let at = self.records[id as usize - 1];
                let is_struct =
                    u32_at(self.btf, at + 4).map(|i| (i >> 24) & 0x1f) == Some(KIND_STRUCT);
                is_struct
                    && u32_at(self.btf, at).and_then(|n| self.name(n)) == Some(strukt.as_bytes())
                    && self.members(id).is_some_and(|m| !m.is_empty())
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        self.find(id, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            })
    }

    /// `member`'s offset in bits within type `id`, searched depth-first through anonymous members;
    /// `depth` bounds the search in a malformed blob.
    fn find(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let members = self.members(id)?;
        if let Some(m) = members.iter().find(|m| self.name(m.name) == Some(member)) {
            return Some(m.bits);
        }
        members
            .iter()
            .filter(|m| m.name == 0)
            .find_map(|m| Some(m.bits + self.find(m.ty, member, depth + 1)?))
    }
}

fn u32_at(btf: &[u8], o: usize) -> Option<u32> {
    btf.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int`, `union { int x; int sk; }`, then `struct sk_buff { int a; int cb;
    /// <that union>; }` and `struct tcp_sock { int pad; int copied_seq; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0sk_buff\0a\0cb\0x\0sk\0tcp_sock\0pad\0copied_seq\0";
        let s = |name: &str| -> u32 {
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .expect("name in the string section") as u32
                + 1
        };
        let mut types = Vec::new();
        let push = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        // [1] int: kind 1, size 4, then its encoding word.
        for x in [s("int"), 1 << 24, 4, 32] {
            push(&mut types, x);
        }
        // [2] an anonymous union of two ints, size 4.
        for x in [0, (5 << 24) | 2, 4, s("x"), 1, 0, s("sk"), 1, 0] {
            push(&mut types, x);
        }
        // [3] struct sk_buff, size 12: a at 0, cb at 4, the union at 8.
        for x in [s("sk_buff"), (4 << 24) | 3, 12] {
            push(&mut types, x);
        }
        for (name, ty, bits) in [(s("a"), 1, 0), (s("cb"), 1, 32), (0, 2, 64)] {
            for x in [name, ty, bits] {
                push(&mut types, x);
            }
        }
        // [4] struct tcp_sock, size 8.
        for x in [s("tcp_sock"), (4 << 24) | 2, 8] {
            push(&mut types, x);
        }
        for (name, bits) in [(s("pad"), 0), (s("copied_seq"), 32)] {
            for x in [name, 1, bits] {
                push(&mut types, x);
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for x in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            push(&mut out, x);
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn offsets_are_found_in_bytes_also_inside_anonymous_unions() {
        let layout = SkbLayout::from_btf(&blob()).unwrap();
        assert_eq!(
            layout,
            SkbLayout {
                cb: 4,
                sk: 8,
                copied_seq: 4
            }
        );
    }

    #[test]
    fn absent_names_and_broken_blobs_are_errors() {
        let b = blob();
        let types = Types::parse(&b).unwrap();
        assert_eq!(types.member_offset("sk_buff", "a").unwrap(), 0);
        assert!(matches!(
            types.member_offset("sk_buff", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            types.member_offset("other", "a"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(
            SkbLayout::from_btf(&b[..40]),
            Err(BtfError::Format(_))
        ));
        assert!(matches!(
            SkbLayout::from_btf(b"garbage!"),
            Err(BtfError::Format(_))
        ));
    }

    #[test]
    fn releases_before_6_6_or_unreadable_ones_are_refused() {
        for ok in ["6.6.0", "6.18.44", "6.6.12-1-amd64", "7.0-rc1", "10.1"] {
            assert!(release_supported(ok), "{ok}");
        }
        for old in [
            "6.5.13",
            "6.1.0-27-cloud-amd64",
            "5.15.0-91-generic",
            "4.19",
            "",
            "six",
            "6",
        ] {
            assert!(!release_supported(old), "{old:?}");
        }
    }

    #[test]
    fn this_kernel_has_the_three_offsets_where_its_btf_says() {
        // The offsets vary by kernel; that they are found and plausible is what matters.
        let l = SkbLayout::of_kernel().expect("the layout from /sys/kernel/btf/vmlinux");
        assert!((16..256).contains(&l.cb), "sk_buff.cb at {}", l.cb);
        assert!((8..64).contains(&l.sk), "sk_buff.sk at {}", l.sk);
        assert!(
            (256..4096).contains(&l.copied_seq),
            "tcp_sock.copied_seq at {}",
            l.copied_seq
        );
    }
}
