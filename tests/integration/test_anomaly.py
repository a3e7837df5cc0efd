"""Scoring against brute-force references (spec section 5)."""

import numpy as np
import pytest

from glad_runtime.core.scoring import (anomaly_map, gaussian_blur, imagenet_normalize, nn_cosine_distance,
                                  resize_bilinear, topk_mean)


def brute_nn(q, r):
    q = q.reshape(q.shape[0], -1, q.shape[-1]).astype(np.float64)
    r = r.reshape(r.shape[0], -1, r.shape[-1]).astype(np.float64)
    out = np.zeros(q.shape[:2])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            best = 2.0
            for j in range(r.shape[1]):
                c = q[b, i] @ r[b, j] / (np.linalg.norm(q[b, i]) * np.linalg.norm(r[b, j]))
                best = min(best, 1 - c)
            out[b, i] = best
    return out


def test_nn_distance_brute_force_and_chunking():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 5, 7)).astype(np.float32)
    r = rng.standard_normal((2, 5, 5, 7)).astype(np.float32)
    ref = brute_nn(q, r).reshape(2, 5, 5)
    full = nn_cosine_distance(q, r, chunk_size=10_000)
    np.testing.assert_allclose(full, ref, atol=1e-5)
    for chunk in (1, 3, 7, 25):
        np.testing.assert_allclose(nn_cosine_distance(q, r, chunk_size=chunk), full, atol=1e-6)
    assert np.all(nn_cosine_distance(q, q) < 1e-5)  # every patch finds itself


def test_nn_distance_4096_tokens_bounded():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 64, 64, 16)).astype(np.float32)
    out = nn_cosine_distance(q, q[:, ::-1], chunk_size=512)
    assert out.shape == (1, 64, 64) and out.max() < 1e-5


def test_nn_distance_errors():
    with pytest.raises(ValueError):
        nn_cosine_distance(np.ones((1, 4, 3)), np.ones((1, 4, 5)))
    with pytest.raises(ValueError):
        nn_cosine_distance(np.full((1, 4, 3), np.nan), np.ones((1, 4, 3)))


def test_resize_matches_torch_align_corners():
    import torch

    x = np.random.default_rng(2).standard_normal((2, 3, 7, 9)).astype(np.float32)
    for size in [(14, 18), (64, 64), (5, 4), (7, 9)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                              align_corners=True).numpy()
        np.testing.assert_allclose(resize_bilinear(x, size), ref, atol=1e-5)


def test_gaussian_blur_matches_kornia_kernel():
    """sigma 6 -> kernel 49, reflect border without edge repeat (numpy 'reflect' padding)."""
    x = np.random.default_rng(3).random((1, 60, 70)).astype(np.float32)
    sigma, k = 6.0, 49
    g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    p = np.pad(x[0].astype(np.float64), k // 2, mode="reflect")
    rows = np.array([np.convolve(row, g, mode="valid") for row in p])
    ref = np.array([np.convolve(col, g, mode="valid") for col in rows.T]).T
    np.testing.assert_allclose(gaussian_blur(x, sigma)[0], ref, atol=1e-5)


def test_topk_mean():
    v = np.arange(20, dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(topk_mean(v, 3), [8.0, 18.0])
    np.testing.assert_allclose(topk_mean(v, 100), [4.5, 14.5])


def test_anomaly_map_reference():
    rng = np.random.default_rng(4)
    fi = [rng.standard_normal((2, 4, 4, 6)).astype(np.float32) for _ in range(2)]
    fr = [rng.standard_normal((2, 4, 4, 6)).astype(np.float32) for _ in range(2)]
    xi = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    xr = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    size = (16, 16)
    fwd = sum(resize_bilinear(brute_nn(a, b).reshape(2, 4, 4), size) for a, b in zip(fi, fr))
    bwd = sum(resize_bilinear(brute_nn(b, a).reshape(2, 4, 4), size) for a, b in zip(fi, fr))
    np.testing.assert_allclose(anomaly_map(fi, fr, size, blur_sigma=0), fwd, atol=1e-5)
    np.testing.assert_allclose(anomaly_map(fi, fr, size, blur_sigma=0, bidirectional="sum"), fwd + bwd, atol=1e-5)
    np.testing.assert_allclose(anomaly_map(fi, fr, size, blur_sigma=0, bidirectional="mean"), (fwd + bwd) / 2,
                               atol=1e-5)
    # pixel term normalised per image (project decision 2)
    d = np.abs(imagenet_normalize(xi) - imagenet_normalize(xr)).mean(1)
    expect = fwd + 2.0 * (fwd.reshape(2, -1).max(1) / d.reshape(2, -1).max(1))[:, None, None] * d
    got = anomaly_map(fi, fr, size, images_input=xi, images_recon=xr, pixel_weight=2.0, blur_sigma=0)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    # per image: scoring image 1 alone equals scoring it inside the batch
    alone = anomaly_map([f[1:] for f in fi], [f[1:] for f in fr], size, images_input=xi[1:], images_recon=xr[1:],
                        pixel_weight=2.0)
    both = anomaly_map(fi, fr, size, images_input=xi, images_recon=xr, pixel_weight=2.0)
    np.testing.assert_allclose(alone[0], both[1], atol=1e-6)
