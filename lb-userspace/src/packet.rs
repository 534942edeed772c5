//! Building and inspecting Ethernet/IPv4/TCP/UDP frames: for running the XDP programs on
//! crafted packets (`BPF_PROG_TEST_RUN` tests, `cargo xtask bench xdp`) and for checking what
//! they produced. Plain functions over bytes, testable without a kernel.
use std::net::Ipv4Addr;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Minimal IPv4 header length.
pub const IPV4_LEN: usize = 20;

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

impl Frame {
    /// The frame's bytes: Ethernet, IPv4 (with options), TCP (20 bytes, SYN) or UDP (8 bytes)
    /// or nothing for other protocols, then the payload.
    pub fn build(&self) -> Vec<u8> {
        let l4: Vec<u8> = match self.proto {
            6 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.sport.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = 0x02; // SYN
                t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
                t
            }
            17 => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.sport.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u
            }
            _ => Vec::new(),
        };
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

/// The outer IPv4 header of an IP-in-IP frame as `lb_xdp` writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outer {
    /// Outer source (the LB address).
    pub src: Ipv4Addr,
    /// Outer destination (the backend).
    pub dst: Ipv4Addr,
    /// TTL.
    pub ttl: u8,
    /// Total length field.
    pub tot_len: u16,
    /// Whether the header checksum verifies.
    pub checksum_ok: bool,
    /// TOS byte.
    pub tos: u8,
    /// DF bit set.
    pub dont_fragment: bool,
}

/// Parses the outer header of an encapsulated frame; None if the frame is not IPv4-in-IPv4.
pub fn parse_outer(frame: &[u8]) -> Option<Outer> {
    if frame.len() < ETH_LEN + 2 * IPV4_LEN || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_LEN..ETH_LEN + IPV4_LEN];
    if ip[0] != 0x45 || ip[9] != 4 {
        return None;
    }
    Some(Outer {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        tot_len: u16::from_be_bytes([ip[2], ip[3]]),
        checksum_ok: checksum(ip) == 0,
        tos: ip[1],
        dont_fragment: ip[6] & 0x40 != 0,
    })
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
