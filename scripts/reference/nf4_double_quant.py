"""NF4 with double quantization as bitsandbytes' reference (default-backend) kernels compute it,
in plain torch (bitsandbytes itself is not needed): the values `tests/qlora.rs` and
`crates/candle-train/src/quant/nf4.rs` check. Run by hand: `python3 scripts/reference/nf4_double_quant.py`.

Follows bitsandbytes `functional.py` (`quantize_4bit(..., compress_statistics=True)`,
`create_dynamic_map`) and `backends/default/ops.py` (`quantize_4bit`, `quantize_blockwise`,
`dequantize_blockwise`, `_dequantize_4bit_impl`).
"""
import struct

import torch

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data)


def quantize_blockwise(a, code, blocksize):
    n = a.numel()
    blocks = (n + blocksize - 1) // blocksize
    out, absmax = [], torch.zeros(blocks)
    for b in range(blocks):
        chunk = a[b * blocksize:(b + 1) * blocksize]
        absmax[b] = chunk.abs().max()
        scaled = torch.clamp(chunk * (1 / absmax[b]), -1, 1)
        out.append(torch.argmin(torch.abs(scaled.unsqueeze(-1) - code), dim=-1))
    return torch.cat(out), absmax


def main():
    # The test's input: three blocks of 64 with absmaxes 1, 2 and 4.
    values = torch.tensor([((j * 37) % 64 - 31.5) / 31.5 for j in range(192)], dtype=torch.float32)
    values[64:128] *= 2
    values[128:] *= 4
    codes, absmax = quantize_blockwise(values, NF4, 64)
    offset = absmax.mean()
    dyn = create_dynamic_map()
    q8, absmax2 = quantize_blockwise(absmax - offset, dyn, 256)
    deq_absmax = dyn[q8] * absmax2[0] + offset
    out = NF4[codes] * deq_absmax.repeat_interleave(64)
    bits = lambda t: [hex(struct.unpack("<I", struct.pack("<f", float(v)))[0]) for v in t]
    print("codes[0..8]", codes[:8].tolist(), "codes[64..68]", codes[64:68].tolist())
    print("absmax", bits(absmax), "offset", bits([offset]))
    print("q8", q8.tolist(), "absmax2", bits(absmax2))
    print("dequantized absmax", deq_absmax.tolist(), bits(deq_absmax))
    print("out[0..4]", bits(out[:4]), "out[130]", bits(out[130:131]))
    print("dynamic map bits (nf4.rs DYNAMIC_MAP_BITS):")
    for i in range(0, 256, 8):
        print("   ", ", ".join(h for h in bits(dyn[i:i + 8])) + ",")


if __name__ == "__main__":
    main()
