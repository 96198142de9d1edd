//! A float64 scalar reference written from the definitions, independent of the kernels.

#![allow(dead_code)]

pub struct Ref {
    pub entropy: f64,
    pub logprob: f64,
    pub collision: f64,
    pub grad_norm: f64,
}

/// Statistics of softmax(row / tau) with target y, straight from the definitions.
pub fn reference(row: &[f64], y: usize, tau: f64) -> Ref {
    let z: Vec<f64> = row.iter().map(|v| v / tau).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
    let lse = m + sum.ln();
    let p: Vec<f64> = z.iter().map(|v| (v - lse).exp()).collect();
    let entropy = -z.iter().zip(&p).filter(|(_, p)| **p > 0.0).map(|(v, p)| p * (v - lse)).sum::<f64>();
    let grad_sq: f64 = p.iter().enumerate().map(|(j, p)| if j == y { (p - 1.0).powi(2) } else { p * p }).sum();
    Ref { entropy, logprob: z[y] - lse, collision: p.iter().map(|p| p * p).sum(), grad_norm: grad_sq.sqrt() }
}

/// SPEC 2's accuracy bounds for f32 input.
pub fn assert_close(got: (f32, f32, f32, f32), want: &Ref, what: &str) {
    let (h, l, c, g) = got;
    let dh = (f64::from(h) - want.entropy).abs();
    let dl = (f64::from(l) - want.logprob).abs();
    let dc = (f64::from(c) - want.collision).abs();
    let dg = (f64::from(g) - want.grad_norm).abs();
    assert!(dh <= 1e-4 * want.entropy.max(1.0), "{what}: entropy {h} vs {}", want.entropy);
    assert!(dl <= 1e-4 * want.logprob.abs().max(1.0), "{what}: logprob {l} vs {}", want.logprob);
    assert!(dc <= 1e-6, "{what}: collision {c} vs {}", want.collision);
    assert!(dg <= 1e-5, "{what}: grad_norm {g} vs {}", want.grad_norm);
}

/// A small deterministic generator (splitmix64) so tests need no RNG crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
