//! CPace over ristretto255 with SHA-512 (draft-irtf-cfrg-cpace, §7.1 generator, §6.2 protocol,
//! initiator/responder transcript), as pure functions. The handshake
//! ([`super::handshake`]) supplies the password-related string (PRS), the channel identifier (CI)
//! and the session id (sid), exchanges the shares and derives its keys from the ISK.
//!
//! Why CPace: the password only enters through the generator `G = hash_to_ristretto(PRS, CI,
//! sid)`, whose discrete logarithm nobody knows. A share `Y = y·G` is a uniformly random group
//! element whatever the password, and an attacker who sent `Y' = y'·G(guess)` can compute the
//! victim's `K = y·Y'` only if `guess` was right: one online guess per session, nothing offline.
//! The known-answer tests below are the draft's ristretto255 test vectors.

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha512};

/// Domain separation identifier of the ristretto255 suite.
pub const DSI: &[u8] = b"CPaceRistretto255";
/// Input block size of SHA-512 (`H.s_in_bytes`): the zero padding fills the PRS's block.
const S_IN_BYTES: usize = 128;

/// Why a share was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CpaceError {
    #[error("share is not a valid ristretto255 encoding")]
    BadEncoding,
    #[error("share yields the identity element")]
    Identity,
}

/// LEB128 length prefix (`prepend_len`).
fn prepend_len(data: &[u8], out: &mut Vec<u8>) {
    let mut len = data.len();
    loop {
        if len < 128 {
            out.push(len as u8);
            break;
        }
        out.push((len & 0x7f) as u8 | 0x80);
        len >>= 7;
    }
    out.extend_from_slice(data);
}

/// `lv_cat(parts...)`: each part with its LEB128 length in front.
pub fn lv_cat(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        prepend_len(p, &mut out);
    }
    out
}

fn leb_len(n: usize) -> usize {
    let mut out = Vec::new();
    prepend_len(&vec![0u8; n], &mut out);
    out.len() - n
}

/// `generator_string(DSI, PRS, CI, sid, s_in_bytes)`.
pub fn generator_string(prs: &[u8], ci: &[u8], sid: &[u8]) -> Vec<u8> {
    let zpad = S_IN_BYTES
        .saturating_sub(1)
        .saturating_sub(prs.len() + leb_len(prs.len()))
        .saturating_sub(DSI.len() + leb_len(DSI.len()));
    lv_cat(&[DSI, prs, &vec![0u8; zpad], ci, sid])
}

/// `calculate_generator`: hash the generator string with SHA-512 and map it to the group
/// (RFC 9496 one-way map, whose output has no known discrete logarithm).
pub fn generator(prs: &[u8], ci: &[u8], sid: &[u8]) -> RistrettoPoint {
    let digest: [u8; 64] = Sha512::digest(generator_string(prs, ci, sid)).into();
    RistrettoPoint::from_uniform_bytes(&digest)
}

/// A fresh secret scalar (uniform mod the group order).
pub fn random_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// Our share `Y = y·G`, encoded.
pub fn share(y: &Scalar, g: &RistrettoPoint) -> [u8; 32] {
    (g * y).compress().to_bytes()
}

/// `scalar_mult_vfy(y, Y_other)`: decode the remote share and multiply; an invalid encoding or
/// an identity result is an error (the draft's abort conditions).
pub fn shared_point(y: &Scalar, theirs: &[u8; 32]) -> Result<[u8; 32], CpaceError> {
    let point = CompressedRistretto(*theirs)
        .decompress()
        .ok_or(CpaceError::BadEncoding)?;
    let k = point * y;
    if k == RistrettoPoint::identity() {
        return Err(CpaceError::Identity);
    }
    Ok(k.compress().to_bytes())
}

/// `ISK = H(lv_cat(DSI‖"_ISK", sid, K) ‖ lv_cat(Ya, ADa) ‖ lv_cat(Yb, ADb))` (initiator/responder
/// transcript; `a` = initiator).
pub fn isk(sid: &[u8], k: &[u8; 32], ya: &[u8], ada: &[u8], yb: &[u8], adb: &[u8]) -> [u8; 64] {
    let mut dsi_isk = DSI.to_vec();
    dsi_isk.extend_from_slice(b"_ISK");
    let mut h = Sha512::new();
    h.update(lv_cat(&[&dsi_isk, sid, k]));
    h.update(lv_cat(&[ya, ada]));
    h.update(lv_cat(&[yb, adb]));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn arr32(s: &str) -> [u8; 32] {
        hex(s).try_into().unwrap()
    }

    #[test]
    fn lv_cat_matches_draft() {
        assert_eq!(
            lv_cat(&[b"1234", b"5", b"", b"678"]),
            b"\x041234\x015\x00\x03678".to_vec()
        );
        let mut long = Vec::new();
        prepend_len(&[7u8; 200], &mut long);
        assert_eq!(&long[..2], &[0xc8, 0x01]);
    }

    // draft-irtf-cfrg-cpace, "Test vector for CPace using group ristretto255 and hash SHA-512".
    #[test]
    fn draft_test_vectors() {
        let prs = b"Password";
        let ci = hex("0b415f696e69746961746f720b425f726573706f6e646572");
        let sid = hex("7e4b4791d6a8ef019b936c79fb7f2c57");
        let gs = generator_string(prs, &ci, &sid);
        assert_eq!(gs.len(), 170);
        assert_eq!(
            Sha512::digest(&gs).to_vec(),
            hex("da6d3ddc8802fca9058755ffd3ebde08a9c2c74945901a258482a288
                 b6663af06bf645c93cd1c51512307199c80e84908916d983b34af772
                 05f90851a657ee27")
        );
        let g = generator(prs, &ci, &sid);
        assert_eq!(
            g.compress().to_bytes(),
            arr32("222b6b195fe84b1652badb6f6a3ae3d24341e7306967f0b8115b40d5698c7e56")
        );
        let ya = Scalar::from_bytes_mod_order(arr32(
            "da3d23700a9e5699258aef94dc060dfda5ebb61f02a5ea77fad53f4ff0976d08",
        ));
        let yb = Scalar::from_bytes_mod_order(arr32(
            "d2316b454718c35362d83d69df6320f38578ed5984651435e2949762d900b80d",
        ));
        let pa = share(&ya, &g);
        let pb = share(&yb, &g);
        assert_eq!(
            pa,
            arr32("d6bac480f2c386c394efc7c47adb9925dcd2630b64f240c50f8d0eec482b9157")
        );
        assert_eq!(
            pb,
            arr32("3ea7e0b19560d7c0b0f5734f63b955286dfa8232b5ebe63324e2d9e7433f7258")
        );
        let k = arr32("80b69a8a76457ab6a4d7f887a4bf6b55a2f80ac19c333f917a05fc9887c8b40f");
        assert_eq!(shared_point(&ya, &pb), Ok(k));
        assert_eq!(shared_point(&yb, &pa), Ok(k));
        assert_eq!(
            isk(&sid, &k, &pa, b"ADa", &pb, b"ADb").to_vec(),
            hex("b69effbf61b51d56401c0f65601abe428de8206feaaf0e32198896dc
                 ae7b35cd2b38950a39dfd5d4a79164614c2984f7daa460b588c1e80c
                 3fa2068af7900447")
        );
    }

    #[test]
    fn bad_shares_rejected() {
        let y = random_scalar(&mut rand_core::OsRng);
        assert_eq!(shared_point(&y, &[0u8; 32]), Err(CpaceError::Identity));
        assert_eq!(shared_point(&y, &[0xff; 32]), Err(CpaceError::BadEncoding));
        // A non-canonical encoding (the field modulus itself).
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert_eq!(shared_point(&y, &p), Err(CpaceError::BadEncoding));
    }
}
