"""csrc/cpu/vec16.h's exp16 against std::exp, compiled by g++ for the baseline, AVX2 and AVX-512: the copies of
the CPU paged kernel that target_clones picks from, only one of which the op tests run on a given CPU."""
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
# -march level -> the /proc/cpuinfo flag a CPU needs to run its code
LEVELS = {"x86-64": None, "x86-64-v3": "avx2", "x86-64-v4": "avx512f"}


@pytest.mark.parametrize("march", list(LEVELS))
def test_exp16_is_within_two_ulp_of_std_exp(tmp_path, march):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    flag, cpuinfo = LEVELS[march], Path("/proc/cpuinfo")
    if flag and (not cpuinfo.exists() or flag not in cpuinfo.read_text().split()):
        pytest.skip(f"this CPU lacks {flag}")
    (tmp_path / "t.cpp").write_text(HARNESS)
    subprocess.run(["g++", "-O3", f"-march={march}", "-std=c++17", f"-I{CSRC}", "t.cpp", "-o", "t"], cwd=tmp_path,
                   check=True, capture_output=True)
    worst, tiny, one = map(float, subprocess.run([tmp_path / "t"], check=True, capture_output=True, text=True)
                           .stdout.split())
    assert worst <= 2.0
    assert 0 < tiny < 1e-37 and one == 1.0  # below -87: exp(-87), no zero or NaN from the bit tricks
