"""A small labelled set for zero-shot classification: 60 sentences, 6 topics, 10 each.

Written by hand for these tests (not drawn from any data set). Sentences avoid naming their
label word where a natural sentence would not, so the classifier has to generalise.
"""

from __future__ import annotations

__all__ = ["LABELLED", "LABELS", "MULTI_LABELLED"]

LABELS: tuple[str, ...] = ("sports", "politics", "technology", "food", "weather", "health")

LABELLED: tuple[tuple[str, str], ...] = (
    # sports
    ("The striker scored twice in the second half and the home side won the derby.", "sports"),
    ("She broke the national record in the 400 metres at the championships.", "sports"),
    ("The quarterback threw three touchdown passes before halftime.", "sports"),
    ("After five sets, the defending champion lifted the trophy at Wimbledon.", "sports"),
    ("The coach was sacked after the team lost eight league games in a row.", "sports"),
    ("He finished the marathon in just under two hours and ten minutes.", "sports"),
    ("The cyclist took the yellow jersey on the mountain stage.", "sports"),
    ("Our basketball team signed a new point guard for next season.", "sports"),
    ("The referee showed a red card and the penalty decided the match.", "sports"),
    ("The swimmer won gold in the relay at the Olympic Games.", "sports"),
    # politics
    ("Parliament passed the budget bill after a long night of debate.", "politics"),
    ("The senator announced she will run for president next year.", "politics"),
    ("Voters head to the polls on Sunday to elect a new mayor.", "politics"),
    ("The prime minister reshuffled the cabinet after the scandal.", "politics"),
    ("Opposition parties called for a vote of no confidence in the government.", "politics"),
    ("The new law on immigration was approved by a narrow majority.", "politics"),
    ("Diplomats from both countries met to negotiate a peace treaty.", "politics"),
    ("The governor vetoed the tax reform passed by the state legislature.", "politics"),
    ("Campaign rallies drew thousands of supporters ahead of the election.", "politics"),
    ("The ministry of foreign affairs summoned the ambassador.", "politics"),
    # technology
    ("The new smartphone has a faster processor and a better camera.", "technology"),
    ("Engineers released a software update that fixes the security bug.", "technology"),
    ("The startup trained a neural network to translate speech in real time.", "technology"),
    ("Cloud servers went down and thousands of websites were unreachable.", "technology"),
    ("The laptop ships with 32 gigabytes of memory and a solid state drive.", "technology"),
    ("Programmers can now write the app in Rust and compile it to WebAssembly.", "technology"),
    ("The chip maker unveiled a processor built on a three nanometre process.", "technology"),
    ("Researchers demonstrated a quantum computer with more than a thousand qubits.", "technology"),
    ("The browser now blocks third-party cookies by default.", "technology"),
    ("A robot vacuum maps the rooms with a laser sensor.", "technology"),
    # food
    ("Simmer the tomatoes with garlic and basil for twenty minutes.", "food"),
    ("This bakery makes the best sourdough bread in town.", "food"),
    ("Whisk the eggs with sugar until pale, then fold in the flour.", "food"),
    ("The restaurant serves fresh sushi and a spicy ramen.", "food"),
    ("Add a pinch of salt and roast the vegetables until golden.", "food"),
    ("Her grandmother's apple pie recipe uses cinnamon and butter.", "food"),
    ("The chef seared the steak and served it with mashed potatoes.", "food"),
    ("We ordered pizza with mushrooms, olives and extra cheese.", "food"),
    ("Marinate the chicken overnight in yogurt and spices.", "food"),
    ("The chocolate cake was rich, moist and far too sweet.", "food"),
    # weather
    ("Heavy rain and strong winds are expected across the coast tonight.", "weather"),
    ("Temperatures will drop below freezing with snow by the weekend.", "weather"),
    ("A heatwave pushed the thermometer past forty degrees.", "weather"),
    ("The forecast says sunny skies with a light breeze tomorrow.", "weather"),
    ("The hurricane made landfall as a category four storm.", "weather"),
    ("Thick fog delayed flights at the airport this morning.", "weather"),
    ("Thunderstorms with hail are likely in the afternoon.", "weather"),
    ("It has not rained for weeks and the drought is getting worse.", "weather"),
    ("Meteorologists issued a warning for icy roads overnight.", "weather"),
    ("The humidity is high and showers will clear by evening.", "weather"),
    # health
    ("Regular exercise and enough sleep lower the risk of heart disease.", "health"),
    ("The doctor prescribed antibiotics for the throat infection.", "health"),
    ("A new vaccine reduced hospital admissions by half in the trial.", "health"),
    ("Patients with diabetes should check their blood sugar every day.", "health"),
    ("The hospital opened a new ward for cancer treatment.", "health"),
    ("Smoking damages the lungs and raises blood pressure.", "health"),
    ("Nurses say the flu season has filled the emergency room.", "health"),
    ("Drinking enough water helps prevent headaches and fatigue.", "health"),
    ("The surgeon replaced the patient's damaged knee joint.", "health"),
    ("Mental health services report long waiting lists for therapy.", "health"),
)

# Sentences about two topics at once, for multi-label checks: (text, labels it is about).
MULTI_LABELLED: tuple[tuple[str, frozenset[str]], ...] = (
    ("The football match was cancelled because of the thunderstorm.", frozenset({"sports", "weather"})),
    ("The president promised new funding for hospitals and vaccines.", frozenset({"politics", "health"})),
    (
        "An app uses artificial intelligence to suggest recipes from your fridge.",
        frozenset({"technology", "food"}),
    ),
    ("Eating less sugar and salt improves your heart health.", frozenset({"food", "health"})),
)
