"""The CPU paged kernels' vector helpers, compiled by g++ for the baseline, AVX2 and AVX-512 (a CPU runs the op
tests only through the copies it has): csrc/cpu/vec16.h's exp16 against std::exp, and csrc/cpu/hsum.h's sums of
16 vectors against plain sums, at every vector width."""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cpu"
HARNESS = r"""
#include <cmath>
#include <cstdio>
#include "vec16.h"
using llmfast::f32x16;
int main() {
  double worst = 0;  // in ulps of std::exp
  for (double x0 = -87.0; x0 < 87.99; x0 += 0.0007) {
    f32x16 x;
    for (int l = 0; l < 16; ++l) x[l] = static_cast<float>(x0 + l * 3e-5);
    const f32x16 e = llmfast::exp16(x);
    for (int l = 0; l < 16; ++l) {
      const float ref = std::exp(x[l]);
      worst = std::fmax(worst, std::fabs(double(e[l]) - ref) / (std::nextafter(ref, INFINITY) - ref));
    }
  }
  const f32x16 zero = {}, tiny = llmfast::exp16(zero - 1000.f), one = llmfast::exp16(zero);
  std::printf("%.3f %g %g\n", worst, tiny[0], one[0]);
}
"""
HSUM_HARNESS = r"""
#include <cmath>
#include <cstdio>
#include "hsum.h"
template <int V>
double worst_error() {  // relative, of sums of 16 vectors of V lanes whose lanes all differ; 1 for a wrong max
  llmfast::vec_t<V> x[16];
  for (int t = 0; t < 16; ++t)
    for (int l = 0; l < V; ++l) x[t][l] = std::ldexp(1.0f, t) * (1 + (5 * l + t) % V) + 0.001f * (l * l + t);
  float sums[16], maxima[16];
  llmfast::sum16<V>(x, sums);
  llmfast::reduce16<V, llmfast::Max>(x, maxima);
  double worst = 0;
  for (int t = 0; t < 16; ++t) {
    double ref = 0;
    float most = x[t][0];
    for (int l = 0; l < V; ++l) ref += x[t][l], most = std::fmax(most, x[t][l]);
    worst = std::fmax(worst, std::fabs(sums[t] - ref) / ref);
    if (maxima[t] != most) worst = 1;  // a maximum is exact
  }
  return worst;
}
int main() { std::printf("%g %g %g\n", worst_error<4>(), worst_error<8>(), worst_error<16>()); }
"""
# -march level -> the /proc/cpuinfo flag a CPU needs to run its code
LEVELS = {"x86-64": None, "x86-64-v3": "avx2", "x86-64-v4": "avx512f"}


def _compile_and_run(tmp_path, march: str, source: str) -> list[float]:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    flag, cpuinfo = LEVELS[march], Path("/proc/cpuinfo")
    if flag and (not cpuinfo.exists() or flag not in cpuinfo.read_text().split()):
        pytest.skip(f"this CPU lacks {flag}")
    (tmp_path / "t.cpp").write_text(source)
    subprocess.run(["g++", "-O3", f"-march={march}", "-std=c++17", f"-I{CSRC}", "t.cpp", "-o", "t"], cwd=tmp_path,
                   check=True, capture_output=True)
    return list(map(float, subprocess.run([tmp_path / "t"], check=True, capture_output=True, text=True).stdout.split()))


@pytest.mark.parametrize("march", list(LEVELS))
def test_exp16_is_within_two_ulp_of_std_exp(tmp_path, march):
    worst, tiny, one = _compile_and_run(tmp_path, march, HARNESS)
    assert worst <= 2.0
    assert 0 < tiny < 1e-37 and one == 1.0  # below -87: exp(-87), no zero or NaN from the bit tricks


@pytest.mark.parametrize("march", list(LEVELS))
def test_sum16_sums_each_vector_at_every_width(tmp_path, march):
    """Each width's fold tree (4, 8 and 16 lanes), compiled for each level, adding and taking maxima: a lane
    sent to the wrong sum is off by a power of two, far above float32 rounding; each maximum is exact."""
    assert all(err <= 1e-6 for err in _compile_and_run(tmp_path, march, HSUM_HARNESS))
