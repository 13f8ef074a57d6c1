"""Max |prob - float32 prob| of the tiny DLRM per quantization mode, for every test that checks it.

Each is about 2-3x the worst seen over 2,000 rows of five models (three random, two trained),
on random inputs with missing and hashed ids. Why each is what it is:
  int8         0.02   symmetric per-channel codes: a weight is off by at most amax/254 (0.4% of
                      the channel's largest weight), the errors average out over a dot product
  int8_act     0.04   int8 weights plus each activation row rounded to amax_row/254: the
                      interaction vector has a wide range per row, so its small entries lose most
  fp8          0.06   e4m3 keeps 3 mantissa bits: up to 6% relative error per weight
  int8_tables  0.008  asymmetric row-wise codes: 256 levels over [row min, row max], an element is
                      off by at most (max - min)/510, finer than int8's symmetric step
  a+b          the sum of both parts' tolerances
"""

DLRM_PROB_TOLERANCE = {
    "none": 0.0,
    "int8": 0.02,
    "int8_act": 0.04,
    "fp8": 0.06,
    "int8_tables": 0.008,
    "int8+int8_tables": 0.028,
    "int8_act+int8_tables": 0.048,
    "fp8+int8_tables": 0.068,
}
