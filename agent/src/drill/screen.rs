//! Screenshots: QEMU hands libvirt a PPM of the guest's screen; a drill
//! wants to know it is not blank and has changed since the first one, and
//! keeps the last as a PNG.

use anyhow::{bail, Context, Result};

/// An RGB picture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Picture {
    /// A binary PPM (`P6`, 8 bits per channel), as QEMU's screendump
    /// writes it. Bounded: at most 16384 pixels a side.
    pub fn from_ppm(b: &[u8]) -> Result<Picture> {
        let mut fields = Vec::new();
        let mut i = 0;
        while fields.len() < 4 {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && b[i] == b'#' {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            let start = i;
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            if start == i {
                bail!("screenshot: truncated PPM header");
            }
            fields.push(std::str::from_utf8(&b[start..i]).context("screenshot: PPM header")?);
        }
        i += 1; // the one whitespace byte before the pixels
        if fields[0] != "P6" {
            bail!("screenshot: not a binary PPM ({:?})", fields[0]);
        }
        let num = |s: &str| -> Result<u32> { s.parse().context("screenshot: PPM header number") };
        let (width, height, max) = (num(fields[1])?, num(fields[2])?, num(fields[3])?);
        if max != 255 || width == 0 || height == 0 || width > 16384 || height > 16384 {
            bail!("screenshot: unsupported PPM {width}x{height}, max {max}");
        }
        let len = width as usize * height as usize * 3;
        let Some(rgb) = b.get(i..i + len) else {
            bail!("screenshot: PPM shorter than {width}x{height}");
        };
        Ok(Picture {
            width,
            height,
            rgb: rgb.to_vec(),
        })
    }

    /// Every pixel the same colour (a screen nothing was drawn on).
    pub fn is_blank(&self) -> bool {
        let first = &self.rgb[..3];
        self.rgb.chunks_exact(3).all(|p| p == first)
    }

    pub fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("encoding the screenshot")?;
        w.write_image_data(&self.rgb)
            .context("encoding the screenshot")?;
        w.finish().context("encoding the screenshot")?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: u32, h: u32, px: &[u8]) -> Vec<u8> {
        let mut b = format!("P6\n# qemu\n{w} {h}\n255\n").into_bytes();
        b.extend_from_slice(px);
        b
    }

    #[test]
    fn reads_ppm_and_tells_blank_from_drawn() {
        let blank = Picture::from_ppm(&ppm(2, 1, &[0, 0, 0, 0, 0, 0])).unwrap();
        assert!(blank.is_blank());
        let drawn = Picture::from_ppm(&ppm(2, 1, &[0, 0, 0, 9, 9, 9])).unwrap();
        assert!(!drawn.is_blank());
        assert_ne!(blank, drawn);
        let png = drawn.png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn refuses_bad_ppm() {
        assert!(Picture::from_ppm(b"P3\n1 1\n255\n000").is_err());
        assert!(Picture::from_ppm(&ppm(4, 4, &[1, 2, 3])).is_err());
        assert!(Picture::from_ppm(b"P6\n").is_err());
        assert!(Picture::from_ppm(&ppm(99999, 1, &[])).is_err());
    }
}
