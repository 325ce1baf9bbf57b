"""Hand-written benchmark fixtures shared by the tests (made-up data, nothing copied from real data sets)."""

from __future__ import annotations

from pathlib import Path

TRIVIAQA_FILE = Path(__file__).parent / "data" / "triviaqa" / "qa" / "tiny-dev.json"
"""A tiny TriviaQA rc file; its evidence is in data/triviaqa/evidence/."""

# made-up articles: 3 articles, 6 paragraphs, 7 questions (one unanswerable, SQuAD 2.0 style)
SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Alpha_Town",
            "paragraphs": [
                {"context": "Alpha Town was founded in 1850 by river traders.",
                 "qas": [{"id": "a1", "question": "When was Alpha Town founded?",
                          "answers": [{"text": "1850", "answer_start": 26}, {"text": "in 1850", "answer_start": 23},
                                      {"text": "1850", "answer_start": 26}]}]},
                {"context": "The mayor of Alpha Town is Jane Doe, elected in 2020.",
                 "qas": [{"id": "a2", "question": "Who is the mayor of Alpha Town?",
                          "answers": [{"text": "Jane Doe", "answer_start": 27}]},
                         {"id": "a3", "question": "Who was mayor in 1700?", "answers": [], "is_impossible": True}]},
            ],
        },
        {
            "title": "Beta_Planet",
            "paragraphs": [
                {"context": "Beta is a blue planet with three moons.",
                 "qas": [{"id": "b1", "question": "How many moons does Beta have?",
                          "answers": [{"text": "three", "answer_start": 28}]}]},
                {"context": "Its largest moon is called Gamma.",
                 "qas": [{"id": "b2", "question": "What is Beta's largest moon called?",
                          "answers": [{"text": "Gamma", "answer_start": 27}]}]},
            ],
        },
        {
            "title": "Delta_Bridge",
            "paragraphs": [
                {"context": "The Delta Bridge is made of red steel.",
                 "qas": [{"id": "d1", "question": "What is the Delta Bridge made of?",
                          "answers": [{"text": "red steel", "answer_start": 28}]}]},
                {"context": "It opened to traffic in May 1999.",
                 "qas": [{"id": "d2", "question": "When did the Delta Bridge open?",
                          "answers": [{"text": "May 1999", "answer_start": 24}]}]},
            ],
        },
    ],
}
