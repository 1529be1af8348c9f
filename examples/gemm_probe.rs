use std::time::Instant;
fn run(
    n: usize,
    d: usize,
    par: gemm::Parallelism,
    split: bool,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) {
    unsafe {
        if !split {
            gemm::gemm(
                n,
                d,
                d,
                y.as_mut_ptr(),
                1,
                d as isize,
                false,
                x.as_ptr(),
                1,
                d as isize,
                w.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        } else {
            let (y0, y1) = y.split_at_mut(n / 2 * d);
            let (x0, x1) = x.split_at(n / 2 * d);
            std::thread::scope(|s| {
                s.spawn(|| {
                    gemm::gemm(
                        n / 2,
                        d,
                        d,
                        y0.as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        x0.as_ptr(),
                        1,
                        d as isize,
                        w.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                });
                gemm::gemm(
                    n - n / 2,
                    d,
                    d,
                    y1.as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    x1.as_ptr(),
                    1,
                    d as isize,
                    w.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            });
        }
    }
}
fn main() {
    for d in [1024usize, 2048] {
        let n = 512;
        let x: Vec<f32> = (0..n * d).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..d * d).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; n * d];
        let mut best = [f64::MAX; 3];
        for _ in 0..15 {
            for (k, (par, split)) in [
                (gemm::Parallelism::Rayon(2), false),
                (gemm::Parallelism::None, true),
                (gemm::Parallelism::None, false),
            ]
            .into_iter()
            .enumerate()
            {
                let t = Instant::now();
                run(n, d, par, split, &x, &w, &mut y);
                best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let fl = 2.0 * (n * d * d) as f64;
        println!(
            "d={d}: rayon2 {:.2} ms ({:.0} GF/s), split2 {:.2} ms ({:.0}), single {:.2} ms ({:.0})",
            best[0],
            fl / best[0] / 1e6,
            best[1],
            fl / best[1] / 1e6,
            best[2],
            fl / best[2] / 1e6
        );
    }
}
