"""Accuracy of a quantized model against fp32, for benchmarks and tests (not the runtime).

Every ``MODEL_QUANTIZATION`` mode must keep the mean cosine to fp32 at or above
:data:`MIN_MEAN_COSINE` on :data:`MULTILINGUAL_EVAL_SENTENCES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["MIN_MEAN_COSINE", "MULTILINGUAL_EVAL_SENTENCES", "mean_cosine", "min_cosine"]

MIN_MEAN_COSINE: Final = 0.99

# Fixed accuracy set for comparing a quantized model to fp32 (report and tests): varied lengths,
# English and Korean (the service's main languages), a few mixed-script, other-script, emoji and
# code inputs, since those exercise rare embedding rows and unusual activations.
MULTILINGUAL_EVAL_SENTENCES: Final[tuple[str, ...]] = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email account?",
    "Quantization reduces memory usage and speeds up inference on commodity CPUs, but it can "
    "hurt accuracy if it is done carelessly.",
    "Apple unveiled its new phone at an event in Cupertino on Tuesday.",
    "Python is a programming language that lets you work quickly and integrate systems more "
    "effectively.",
    "I'm looking for a vegetarian restaurant near the train station that is open late.",
    "The mitochondria is the powerhouse of the cell.",
    "Stock markets fell sharply after the central bank raised interest rates by half a point.",
    "A man is playing a guitar on stage.",
    "Hello!",
    "What is the capital of South Korea?",
    "Seoul is the capital and largest city of South Korea, with nearly ten million people living "
    "in the city proper and about half of the country's population in the wider metropolitan "
    "area. It has been the capital of Korean states for more than six hundred years.",
    "Refunds are processed within five business days after the returned item arrives at our "
    "warehouse.",
    "안녕하세요, 만나서 반갑습니다.",
    "오늘 서울의 날씨는 맑고 최고 기온은 24도입니다.",
    "비밀번호를 잊어버렸는데 어떻게 재설정할 수 있나요?",
    "대한민국의 수도는 서울이며 가장 큰 도시입니다.",
    "한국어 자연어 처리는 형태소 분석과 띄어쓰기 문제 때문에 어렵습니다.",
    "양자화는 메모리 사용량을 줄이고 CPU에서 추론 속도를 높이지만, 부주의하게 적용하면 정확도가 "
    "떨어질 수 있습니다.",
    "회의는 내일 오후 세 시에 본사 회의실에서 열립니다.",
    "김치찌개와 된장찌개 중에서 무엇을 드시겠어요?",
    "이 서비스는 모든 입력 텍스트에 대해 정규화된 벡터를 반환합니다.",
    "주식 시장은 중앙은행의 금리 인상 발표 이후 급격히 하락했습니다.",
    "고양이가 소파 위에서 낮잠을 자고 있다.",
    "네",
    "환불은 반품된 상품이 물류 창고에 도착한 후 영업일 기준 5일 이내에 처리되며, 카드 결제의 "
    "경우 카드사 사정에 따라 추가로 며칠이 더 걸릴 수 있습니다.",
    "서울 Seoul에서 열리는 AI 컨퍼런스 2025에 참가 신청하세요!",
    "이번 release에서는 bug fix와 performance 개선이 포함되었습니다.",
    "今日はいい天気ですね。",
    "我们使用向量来表示句子的含义。",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Le service renvoie des vecteurs normalisés pour chaque texte.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "🚀 Launch day! 🎉🔥",
    "def add(a: int, b: int) -> int:\n    return a + b",
)


def _row_cosines(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    left = np.asarray(a, dtype=np.float64)
    right = np.asarray(b, dtype=np.float64)
    if left.shape != right.shape:
        raise ValueError(f"shape mismatch: {left.shape} vs {right.shape}")
    left = left.reshape(left.shape[0], -1) if left.ndim > 1 else left[None, :]
    right = right.reshape(right.shape[0], -1) if right.ndim > 1 else right[None, :]
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    cosines: np.ndarray = np.einsum("ij,ij->i", left, right) / np.maximum(norms, 1e-30)
    return cosines


def mean_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean row-wise cosine similarity between two embedding matrices of the same shape."""
    return float(_row_cosines(a, b).mean())


def min_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Worst row-wise cosine similarity between two embedding matrices of the same shape."""
    return float(_row_cosines(a, b).min())
