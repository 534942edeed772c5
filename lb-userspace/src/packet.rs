//! Building and inspecting Ethernet/IPv4/IPv6/TCP/UDP frames: for running the XDP programs on
//! crafted packets (`BPF_PROG_TEST_RUN` tests, `cargo xtask bench xdp`) and for checking what
//! they produced. Plain functions over bytes, testable without a kernel.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Minimal IPv4 header length.
pub const IPV4_LEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_LEN: usize = 40;

/// A frame to build. Defaults give a valid TCP SYN from 192.0.2.1:40000 to 198.51.100.1:80.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IANA protocol (6 TCP, 17 UDP, 1 ICMP, …).
    pub proto: u8,
    /// Payload after the L4 header.
    pub payload: Vec<u8>,
    /// IPv4 options (length must be a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// The 16-bit flags + fragment offset field, host order (0x2000 = more fragments).
    pub frag: u16,
    /// TOS byte.
    pub tos: u8,
}

impl Default for Frame {
    fn default() -> Self {
        Self {
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(198, 51, 100, 1),
            sport: 40_000,
            dport: 80,
            proto: 6,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000,
            tos: 0,
        }
    }
}

/// RFC 1071 checksum of `data` (odd length padded with zero).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The L4 header `build` puts in front of the payload: TCP (20 bytes, SYN), UDP (8 bytes, its
/// length field set) or nothing for other protocols.
fn l4_header(proto: u8, sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    match proto {
        6 => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
            t
        }
        17 => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            u[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            u
        }
        _ => Vec::new(),
    }
}

/// An IPv6 frame to build. Defaults give a TCP SYN from [2001:db8::1]:40000 to
/// [2001:db8:100::1]:80.
#[derive(Clone, Debug)]
pub struct Frame6 {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Upper-layer protocol (6 TCP, 17 UDP, 58 ICMPv6, …).
    pub proto: u8,
    /// Extension headers in order, each `(type, bytes)`: whole headers (a multiple of 8
    /// bytes); `build` writes each one's next-header byte, the rest is as given.
    pub ext: Vec<(u8, Vec<u8>)>,
    /// Payload after the L4 header.
    pub payload: Vec<u8>,
    /// Traffic class.
    pub tclass: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
}

impl Default for Frame6 {
    fn default() -> Self {
        Self {
            src: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            dst: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
            sport: 40_000,
            dport: 80,
            proto: 6,
            ext: Vec::new(),
            payload: Vec::new(),
            tclass: 0,
            flow_label: 0,
        }
    }
}

impl Frame6 {
    /// The frame's bytes: Ethernet, IPv6, the extension headers, the L4 header (as in
    /// [`Frame::build`]), then the payload.
    pub fn build(&self) -> Vec<u8> {
        let l4 = l4_header(self.proto, self.sport, self.dport, self.payload.len());
        let mut chain = Vec::new();
        for (i, (_, bytes)) in self.ext.iter().enumerate() {
            let mut h = bytes.clone();
            if let Some(b) = h.first_mut() {
                *b = self.ext.get(i + 1).map_or(self.proto, |(t, _)| *t);
            }
            chain.extend_from_slice(&h);
        }
        let payload_len = chain.len() + l4.len() + self.payload.len();
        let mut f = Vec::with_capacity(ETH_LEN + IPV6_LEN + payload_len);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        let first = u32::from(self.tclass) << 20 | (self.flow_label & 0xf_ffff);
        f.extend_from_slice(&(0x6000_0000 | first).to_be_bytes());
        f.extend_from_slice(&(payload_len as u16).to_be_bytes());
        f.push(self.ext.first().map_or(self.proto, |(t, _)| *t));
        f.push(64);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&chain);
        f.extend_from_slice(&l4);
        f.extend_from_slice(&self.payload);
        f
    }
}

impl Frame {
    /// The frame's bytes: Ethernet, IPv4 (with options), TCP (20 bytes, SYN) or UDP (8 bytes)
    /// or nothing for other protocols, then the payload.
    pub fn build(&self) -> Vec<u8> {
        let l4 = l4_header(self.proto, self.sport, self.dport, self.payload.len());
        let ihl = IPV4_LEN + self.ip_options.len();
        let tot_len = ihl + l4.len() + self.payload.len();
        let mut f = Vec::with_capacity(ETH_LEN + tot_len);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; IPV4_LEN];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[1] = self.tos;
        ip[2..4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f.extend_from_slice(&self.payload);
        f
    }
}

/// The outer header of an encapsulated frame as `lb_xdp` writes it, IPv4 or IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outer {
    /// Outer source (the LB address).
    pub src: IpAddr,
    /// Outer destination (the backend).
    pub dst: IpAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Length of the whole outer packet: IPv4 total length, or 40 + IPv6 payload length.
    pub tot_len: u16,
    /// Whether the header checksum verifies (IPv6 has none: always true).
    pub checksum_ok: bool,
    /// TOS byte or traffic class.
    pub tos: u8,
    /// DF bit set (IPv4 only).
    pub dont_fragment: bool,
    /// IP protocol / next header: 4 (IPv4 inside) or 41 (IPv6 inside).
    pub proto: u8,
    /// IPv6 flow label (0 for IPv4).
    pub flow_label: u32,
    /// Length of the outer header: 20 or 40.
    pub len: usize,
}

/// Parses the outer header of an encapsulated frame; None if the frame is not IP carrying
/// IPv4 or IPv6 (protocol 4 or 41) with an option-less outer header.
pub fn parse_outer(frame: &[u8]) -> Option<Outer> {
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ip = frame.get(ETH_LEN..ETH_LEN + IPV4_LEN)?;
            if ip[0] != 0x45 || (ip[9] != 4 && ip[9] != 41) {
                return None;
            }
            Some(Outer {
                src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into(),
                dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).into(),
                ttl: ip[8],
                tot_len: u16::from_be_bytes([ip[2], ip[3]]),
                checksum_ok: checksum(ip) == 0,
                tos: ip[1],
                dont_fragment: ip[6] & 0x40 != 0,
                proto: ip[9],
                flow_label: 0,
                len: IPV4_LEN,
            })
        }
        [0x86, 0xdd] => {
            let ip = frame.get(ETH_LEN..ETH_LEN + IPV6_LEN)?;
            if ip[0] >> 4 != 6 || (ip[6] != 4 && ip[6] != 41) {
                return None;
            }
            let first = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
            let addr = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&ip[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Some(Outer {
                src: addr(8),
                dst: addr(24),
                ttl: ip[7],
                tot_len: (IPV6_LEN as u16).checked_add(u16::from_be_bytes([ip[4], ip[5]]))?,
                checksum_ok: true,
                tos: (first >> 20) as u8,
                dont_fragment: false,
                proto: ip[6],
                flow_label: first & 0xf_ffff,
                len: IPV6_LEN,
            })
        }
        _ => None,
    }
}

/// The length of the IP packet a frame carries, per its header (IPv4 total length, or 40 +
/// IPv6 payload length), and its TOS/traffic class; None if it is neither.
pub fn ip_len_and_tos(frame: &[u8]) -> Option<(usize, u8)> {
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ip = frame.get(ETH_LEN..ETH_LEN + IPV4_LEN)?;
            Some((usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip[1]))
        }
        [0x86, 0xdd] => {
            let ip = frame.get(ETH_LEN..ETH_LEN + IPV6_LEN)?;
            Some((
                IPV6_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                (ip[0] << 4) | (ip[1] >> 4),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ip_header_checksum_verifies() {
        let f = Frame::default().build();
        assert_eq!(checksum(&f[ETH_LEN..ETH_LEN + IPV4_LEN]), 0);
        assert_eq!(f.len(), ETH_LEN + IPV4_LEN + 20);
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3 example bytes: 00 01 f2 03 f4 f5 f6 f7 → sum 0xddf2, checksum 0x220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }

    #[test]
    fn ipv6_frames_chain_their_extension_headers() {
        let f = Frame6 {
            proto: 17,
            ext: vec![
                (0, vec![0; 8]),
                (60, vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ],
            payload: b"hi".to_vec(),
            ..Frame6::default()
        }
        .build();
        let ip = &f[ETH_LEN..];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(ip[6], 0, "first: hop-by-hop");
        assert_eq!(ip[IPV6_LEN], 60, "then destination options");
        assert_eq!(ip[IPV6_LEN + 8], 17, "then UDP");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            8 + 16 + 8 + 2,
            "payload length"
        );
        assert_eq!(ip_len_and_tos(&f), Some((IPV6_LEN + 34, 0)));
    }

    #[test]
    fn options_extend_the_header_length() {
        let f = Frame {
            ip_options: vec![1, 1, 1, 0],
            ..Frame::default()
        }
        .build();
        assert_eq!(f[ETH_LEN] & 0x0f, 6);
        assert_eq!(checksum(&f[ETH_LEN..ETH_LEN + 24]), 0);
    }
}
