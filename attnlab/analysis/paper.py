"""Published numbers for the arms of the sink sweep, to print beside ours.

Gu et al. 2025 ("When Attention Sink Emerges in Language Models: An Empirical View", ICLR, arXiv:2410.10781;
https://github.com/sail-sg/Attention-Sink): a 60M LLaMA2-style LM pretrained on the
Pile (5B tokens), ``Sink_1^0.3`` on 100 sequences of T = 64 tokens without BOS; * = their proxy score (weights
renormalised per row). Table 6 varies the attention operation, Table 4 adds learnable biases (Sink* = the share
of heads whose sink is the bias slot). Entries marked "3rd-party" come from secondary summaries (unverified) of Qiu et al. 2025 ("Gated Attention for
Large Language Models", arXiv:2505.06708; https://github.com/qiuzh20/gated_attention) and Zuhri et al. 2025
("Softpick: No Attention Sink, No Massive Activations with Rectified Softmax", arXiv:2504.20966;
https://github.com/zaydzuhri/softpick-attention). Guo et al. 2024: "Active-Dormant Attention Heads",
arXiv:2410.13835.
"""

from __future__ import annotations

GU_SETUP = "Gu et al. 2025, 60M LLaMA2-style LM, Pile 5B tokens, T = 64, no BOS"

# arm -> {"sink_1": %, "proxy": Gu's proxy score?, "sink_star": % on the learned slot, "loss": valid loss,
#         "source": where, "text": what to print when there is no Sink_1 number}
PAPER = {
    "softmax": {"sink_1": 18.18, "loss": 3.73, "source": "Gu et al. 2025 Table 6 (60M)"},
    "sigmoid_b0": {"sink_1": 0.44, "proxy": True, "loss": 3.70, "source": "Gu et al. 2025 Table 6 (60M)"},
    "sigmoid_norm": {"sink_1": 30.24, "loss": 3.74, "source": "Gu et al. 2025 Table 6 (60M)"},
    "key_bias": {"sink_1": 0.00, "sink_star": 73.34, "loss": 3.72, "source": "Gu et al. 2025 Table 4 (60M)"},
    "sink_token": {"sink_1": 0.00, "sink_star": 74.12, "loss": 3.72, "source": "Gu et al. 2025 Table 4 (60M)"},
    "relu": {"text": "no sink on BB", "source": "Guo et al. 2024 (BB, qualitative)"},
    "gated": {"text": "first-token attn 4.8 % (46.7 % ungated)", "source": "Qiu et al. 2025, 15B MoE, 3rd-party"},
    "softpick": {"sink_1": 0.0, "source": "Zuhri et al. 2025, 340M, 3rd-party"},
}


def paper_cell(arm: str) -> str:
  """The Markdown cell: ``Sink_1 % [on the slot] / loss (source)``, or "—"."""
  p = PAPER.get(arm)
  if p is None:
    return "—"
  if "sink_1" not in p:
    return f"{p['text']} ({p['source']})"
  cell = f"{p['sink_1']:.2f}{'*' if p.get('proxy') else ''}"
  if "sink_star" in p:
    cell += f" ({p['sink_star']:.2f} on the slot)"
  if "loss" in p:
    cell += f" / {p['loss']:.2f}"
  return f"{cell} ({p['source']})"
