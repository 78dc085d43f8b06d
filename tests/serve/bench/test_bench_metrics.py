"""serve/bench/metrics.py against cases worked out by hand from the Etalon definitions."""

import pytest

from serve.bench import metrics as m

D_P, D_D = m.to_us(0.2), m.to_us(0.1)


def us(*seconds):
  return [m.to_us(s) for s in seconds]


def test_stall_early_vs_late_same_gaps():
  # First token at 0.1 s banks 0.1 s of slack (D_p = 0.2). Early: the 0.3 s stall comes next, with 0.1 s
  # banked: (0.3 - 0.1) // 0.1 = 2 slots missed, slack spent; eight 0.05 s gaps then meet theirs.
  # Slots: 1 + 2 + 8 = 11, missed 2: fluidity 9/11 = 0.818. Late: the eight 0.05 s gaps bank 0.4 s more
  # (0.5 s in all), so the stall meets 0.1 + 0.5: nothing missed, 10 slots, fluidity 1.0.
  early = us(0.1, 0.3, *[0.05] * 8)
  late = us(0.1, *[0.05] * 8, 0.3)
  assert sorted(early) == sorted(late)
  assert m.deadline_slots(early, D_P, D_D) == (2, 11)
  assert m.fluidity_index(early, D_P, D_D) == pytest.approx(9 / 11, abs=1e-12)
  assert round(m.fluidity_index(early, D_P, D_D), 2) == 0.82
  assert m.deadline_slots(late, D_P, D_D) == (0, 10)
  assert m.fluidity_index(late, D_P, D_D) == 1.0


def test_integer_microseconds_where_floats_floor_wrong():
  # In floats the early stall's floor division loses a slot: (0.3 - 0.1) // 0.1 == 1.0.
  assert (0.3 - 0.1) // 0.1 == 1.0
  assert m.to_us(0.3) - m.to_us(0.1) == 200_000 and 200_000 // m.to_us(0.1) == 2
  # Seconds that are not exact in binary round to the microsecond they mean.
  assert m.to_us(0.29999999999999998) == 300_000 and m.to_us(0.7) == 700_000
  assert m.to_us(1e-6) == 1 and m.to_us(2.5e-7) == 0
  # A stall of exactly k deadlines past the 0.1 s slack misses exactly k slots, whatever the float error
  # (k = 1 is exactly on its deadline, which meets it).
  assert m.deadline_slots(us(0.1, 0.2), D_P, D_D) == (0, 2)
  for k in range(2, 8):
    stall = 0.1 + k * 0.1
    assert m.deadline_slots(us(0.1, stall), D_P, D_D) == (k, k + 1)


def test_first_token_miss_counts_passed_decode_slots():
  # TTFT 0.45 s against D_p = 0.2: 1 + (0.45 - 0 - 0.2) // 0.1 = 3 slots; then a 0.05 s gap meets its own.
  assert m.deadline_slots(us(0.45, 0.05), D_P, D_D) == (3, 4)
  assert m.miss_rate(us(0.45, 0.05), D_P, D_D) == 0.75
  # Exactly on a deadline meets it; one microsecond later misses.
  assert m.deadline_slots([D_P, D_D], D_P, D_D) == (0, 2)
  assert m.deadline_slots([D_P + 1, D_D], D_P, D_D) == (1, 2)


def test_chunk_zeros_bank_slack():
  # Offsets: token 1 at 0.1, token 2 at 0.35, tokens 3-4 in the same chunk, token 5 at 0.45.
  gaps = m.gaps_us(us(0.1, 0.35, 0.35, 0.35, 0.45))
  assert gaps == us(0.1, 0.25, 0, 0, 0.1)
  # 0.25 against 0.1 + 0.1 slack: (0.25 - 0.1) // 0.1 = 1 missed, slack spent; the zeros bank 0.1 each;
  # the last 0.1 gap meets 0.1 + 0.2. Slots 1 + 1 + 1 + 1 + 1 = 5, missed 1.
  assert m.deadline_slots(gaps, D_P, D_D) == (1, 5)
  assert m.fluidity_index(gaps, D_P, D_D) == pytest.approx(0.8)


def test_gaps_reject_time_going_backwards():
  with pytest.raises(ValueError, match='non-decreasing'):
    m.gaps_us([100, 50])
  with pytest.raises(ValueError, match='positive'):
    m.deadline_slots([1], D_P, 0)


def test_min_decode_deadline_binary_search():
  # First token ignored; gaps 0.1, 0.1, 0.5. With D_d = d >= 0.1 the two 0.1 gaps bank 2(d - 0.1) and the
  # 0.5 gap meets d + 2(d - 0.1) iff 3d >= 0.7, i.e. d >= 233333.3 us. Below that the stall misses at
  # least 1 of 3 slots (> 0.1), so the smallest d is 233334 us.
  gaps = us(9.0, 0.1, 0.1, 0.5)
  assert m.min_decode_deadline_us(gaps, 0.1) == 233_334
  assert m.miss_rate(gaps, 0, 233_333, ignore_first=True) > 0.1
  assert m.miss_rate(gaps, 0, 233_334, ignore_first=True) == 0.0
  assert m.min_decode_deadline_us(us(1.0)) is None
  assert m.min_decode_deadline_us([5, 0, 0]) == 1
  # Fluid token generation rate: 1 / P99 over requests (numpy linear quantile) of those deadlines.
  rate = m.fluid_token_generation_rate([100_000, 200_000, None], quantile=0.5)
  assert rate == pytest.approx(1 / 0.15)


def test_quantile_miss_rate_curve_point():
  a = us(1.0, 0.05, 0.05)            # no misses at D_d = 0.1
  b = us(1.0, 0.25, 0.05)            # 0.25 // 0.1 = 2 missed of 3 slots
  assert m.quantile_miss_rate_at([a, b], D_D, quantile=1.0) == pytest.approx(2 / 3)
  assert m.quantile_miss_rate_at([a, b], D_D, quantile=0.5) == pytest.approx(1 / 3)


def test_latency_metrics():
  gaps = us(0.5, 0.1, 0.3)
  assert m.ttft_s(gaps) == 0.5
  assert m.tbt_s(gaps) == [0.1, 0.3]
  assert m.tpot_s(gaps) == pytest.approx(0.2)
  assert m.e2e_s(gaps) == pytest.approx(0.9)
  assert m.normalized_latency_s(gaps) == pytest.approx(0.3)
  assert m.output_throughput(gaps) == pytest.approx(3 / 0.9)
  assert m.tpot_s(us(0.5)) is None


def test_summary_percentiles():
  s = m.summary([1.0, 2.0, None, 3.0, 4.0])
  assert s == {'count': 4, 'mean': 2.5, 'p50': 2.5, 'p90': pytest.approx(3.7), 'p99': pytest.approx(3.97),
               'min': 1.0, 'max': 4.0}
  assert m.summary([])['p99'] is None


def test_prefill_fit_recovers_a_quadratic():
  lengths = [16, 64, 128, 256]
  ttfts = [0.01 + 1e-4 * n + 1e-7 * n * n for n in lengths]
  coefficients = m.fit_prefill(lengths, ttfts)
  assert coefficients == pytest.approx((1e-7, 1e-4, 0.01), rel=1e-6)
  assert m.predict_prefill_s(coefficients, 512) == pytest.approx(0.01 + 0.0512 + 0.0262144)
  assert m.fit_prefill([32], [0.05]) == pytest.approx((0.05,))  # one length: a constant
  with pytest.raises(ValueError, match='one minimum TTFT per profiled length'):
    m.fit_prefill([1, 2], [0.1])
