//! Screenshots: libvirt hands over the guest's screen as a PNG (QEMU's
//! own screendump format; older versions a PPM); a drill wants to know it
//! is not blank and has changed since the first one, and keeps the last
//! as a PNG.

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

    /// A screenshot as libvirt gives it: PNG or binary PPM.
    pub fn decode(b: &[u8]) -> Result<Picture> {
        if b.starts_with(b"\x89PNG") {
            Self::from_png(b)
        } else {
            Self::from_ppm(b)
        }
    }

    /// A PNG of any colour type, as 8-bit RGB.
    pub fn from_png(b: &[u8]) -> Result<Picture> {
        let mut dec = png::Decoder::new(std::io::Cursor::new(b));
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().context("screenshot: PNG header")?;
        let (width, height) = (reader.info().width, reader.info().height);
        if width == 0 || height == 0 || width > 16384 || height > 16384 {
            bail!("screenshot: unsupported PNG {width}x{height}");
        }
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader
            .next_frame(&mut buf)
            .context("screenshot: PNG data")?;
        let px = &buf[..frame.buffer_size()];
        let rgb = match frame.color_type {
            png::ColorType::Rgb => px.to_vec(),
            png::ColorType::Rgba => px
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
            png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
            png::ColorType::GrayscaleAlpha => px
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0]])
                .collect(),
            png::ColorType::Indexed => bail!("screenshot: indexed PNG not expanded"),
        };
        if rgb.len() != width as usize * height as usize * 3 {
            bail!("screenshot: PNG data does not fill {width}x{height}");
        }
        Ok(Picture { width, height, rgb })
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
        assert_eq!(Picture::decode(&png).unwrap(), drawn);
    }

    #[test]
    fn refuses_bad_ppm() {
        assert!(Picture::from_ppm(b"P3\n1 1\n255\n000").is_err());
        assert!(Picture::from_ppm(&ppm(4, 4, &[1, 2, 3])).is_err());
        assert!(Picture::from_ppm(b"P6\n").is_err());
        assert!(Picture::from_ppm(&ppm(99999, 1, &[])).is_err());
        let png = Picture::from_ppm(&ppm(2, 1, &[1; 6]))
            .unwrap()
            .png()
            .unwrap();
        assert!(Picture::decode(&png[..png.len() / 2]).is_err());
    }
}
