//! The L4 tier's userspace side: what a VIP is ([`vip`]) and its guards ([`guards`]), the
//! ring writer that keeps `lb_xdp`'s maps in line with the registry ([`writer`]), and the
//! flow-table accounting ([`flows`]).
pub mod flows;
pub mod guards;
pub mod vip;
pub mod writer;

pub use guards::{Cidr, GuardChange, Guards, RateLimit};
pub use vip::{Proto, VipAddr, VipMode, VipSpec, validate_name};
pub use writer::{
    AdoptedVip, Adoption, Applied, BackendInfo, L4Error, L4Maps, L4Member, RingWriter,
};
