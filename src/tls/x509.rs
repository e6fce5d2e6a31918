//! The two facts Velocity needs from a certificate, read from its DER: the names in its
//! subjectAltName (to pick it by SNI) and its notAfter (for `check` and the expiry metric).
//! rustls verifies certificates but does not expose these, and a full X.509 crate would be
//! a large dependency for two fields.

/// One DER element: its tag, its content, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed value's content.
fn children(mut content: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = element(content)?;
        content = rest;
        Some((tag, value))
    })
}

const SEQUENCE: u8 = 0x30;
/// 2.5.29.17, subjectAltName.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// The fields of the TBSCertificate, from `serialNumber` on (the version is skipped).
fn tbs_fields(der: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    Some(children(tbs).filter(|(tag, _)| *tag != 0xa0).collect())
}

/// notAfter as seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let fields = tbs_fields(der)?;
    // serialNumber, signature, issuer, validity.
    let (tag, validity) = *fields.get(3)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, time) = children(validity).nth(1)?;
    parse_time(tag, time)
}

/// The DNS names (lower-cased, `*.` wildcards kept) and IP addresses of the subjectAltName.
pub fn names(der: &[u8]) -> Vec<String> {
    let Some(fields) = tbs_fields(der) else { return Vec::new() };
    let Some((_, extensions)) = fields.iter().find(|(tag, _)| *tag == 0xa3) else { return Vec::new() };
    let Some((_, list, _)) = element(extensions) else { return Vec::new() };
    let mut out = Vec::new();
    for (_, ext) in children(list) {
        let mut parts = children(ext);
        if parts.next() != Some((0x06, SAN_OID)) {
            continue;
        }
        // `critical` is optional: the value is the OCTET STRING, whichever comes.
        let Some((_, value)) = parts.find(|(tag, _)| *tag == 0x04) else { continue };
        let Some((_, general_names, _)) = element(value) else { continue };
        for (tag, name) in children(general_names) {
            match tag {
                // dNSName
                0x82 => {
                    if let Ok(s) = std::str::from_utf8(name) {
                        out.push(s.to_ascii_lowercase());
                    }
                }
                // iPAddress
                0x87 => {
                    if let Ok(v4) = <[u8; 4]>::try_from(name) {
                        out.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(name) {
                        out.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn parse_time(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    let digits = |s: &str| -> Option<i64> { s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok())? };
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(parse_time(0x17, b"000101000000Z"), Some(946_684_800));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x17, b"991231235959Z"), Some(946_684_799));
        assert_eq!(parse_time(0x17, b"9912312359Z"), None);
        assert_eq!(element(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
    }
}
