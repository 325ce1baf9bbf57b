"""A small generic fit set for the activation memory's retrieval transform (written for nativemem).

Short everyday texts of two or three sentences on unrelated topics. They are used when a caller has no
fit set of their own (the demo, ``nativemem fit`` without files): enough to fit a whitening transform
and run the layer probe (first sentence vs the rest), not a substitute for in-domain fit data.
"""

__all__ = ["GENERIC_FIT_TEXTS"]

GENERIC_FIT_TEXTS = [
    "The river flooded the valley in spring. Farmers moved their cattle to the hills until the water fell.",
    "A violin has four strings tuned in fifths. It is played with a bow strung with horsehair.",
    "The town library opens at nine. Students often study there until it closes late at night.",
    "Volcanoes form where tectonic plates meet. Lava cools into new rock over many centuries.",
    "The bakery on the corner sells bread and cakes. Its owner wakes up at four every morning.",
    "Chess is played on a board of sixty-four squares. Each player starts with sixteen pieces.",
    "The train to the coast leaves every hour. The journey takes about two hours in good weather.",
    "Honey bees live in large colonies. A single queen lays thousands of eggs each day in summer.",
    "The museum displays old sea charts. Some of them were drawn by sailors five centuries ago.",
    "Copper conducts electricity very well. It is used in most of the wiring inside houses.",
    "The summer festival lasts three days. Musicians play on five stages spread across the park.",
    "Owls hunt mostly at night. Their soft feathers let them fly almost without a sound.",
    "A marathon is a little over forty-two kilometres long. Runners train for months before a race.",
    "Glaciers move slowly down mountain valleys. They carve deep U-shaped channels into the rock.",
    "The recipe needs two eggs and a cup of flour. The batter rests for an hour before baking.",
    "Lighthouses warn ships away from rocky shores. Many are now run automatically without keepers.",
    "The city council met on Tuesday evening. It voted to build a new bridge over the canal.",
    "Tomatoes grow best in warm sunny places. They need regular watering once the fruit appears.",
    "The telescope was pointed at a distant galaxy. Its light had travelled for millions of years.",
    "Penguins cannot fly but swim very fast. They spend most of their lives in cold ocean water.",
    "The company released a new phone in autumn. Sales were lower than the managers had hoped.",
    "A hurricane forms over warm tropical seas. Its winds can exceed two hundred kilometres an hour.",
    "The old castle stands on a steep hill. Visitors climb two hundred steps to reach the tower.",
    "Bread rises because yeast produces gas. The dough must be kneaded to trap the bubbles.",
    "The orchestra rehearsed the symphony all week. The concert on Saturday was sold out.",
    "Coral reefs grow in shallow clear water. They shelter a quarter of all marine species.",
    "The hikers set off before sunrise. By noon they had reached the summit of the ridge.",
    "Silk is made from the cocoons of silkworms. It was traded along ancient routes across Asia.",
    "The school added a course on computer programming. Forty students signed up in the first week.",
    "Earthquakes are measured with seismometers. The largest ones can be felt thousands of miles away.",
    "The ferry crosses the strait twice a day. In winter storms it sometimes stays in the harbour.",
    "Maple syrup is made from tree sap. The sap is boiled for hours until it thickens.",
    "The painter worked on the portrait for a year. It now hangs in the national gallery.",
    "Wolves live and hunt in packs. Each pack defends a territory that can span hundreds of kilometres.",
    "The bank raised its interest rates in March. Borrowers saw their monthly payments increase.",
    "Cotton plants need a long frost-free season. The fibres are spun into thread for cloth.",
    "The spacecraft landed on the moon in the morning. Engineers on Earth cheered when the signal arrived.",
    "Olive trees can live for centuries. Their fruit is pressed to make oil in the autumn.",
    "The football match ended in a draw. Both teams scored in the last ten minutes.",
    "Salt was once used as money in some regions. It preserved food long before refrigerators existed.",
    "The hospital opened a new wing for children. It has forty beds and a small playground.",
    "Rainbows appear when sunlight passes through raindrops. The light splits into many colours.",
    "The novel follows a family over three generations. It was translated into twenty languages.",
    "Camels store fat in their humps. They can walk for days across the desert without drinking.",
    "The power plant burns natural gas. It supplies electricity to about a million homes.",
    "The gardeners planted tulip bulbs in October. The flowers bloomed in bright rows in April.",
    "A solar eclipse happens when the moon passes in front of the sun. The sky grows dark for minutes.",
    "The factory makes bicycles and spare parts. Most of them are shipped to shops abroad.",
]
