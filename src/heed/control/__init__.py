"""Classic control: PPO on Gymnasium vector environments (:mod:`heed.control.ppo`) and a text
classifier tuned by PPO as a contextual bandit (:mod:`heed.control.bandit`), both on the math of
:mod:`heed.algos`. Importing this package stays light; gymnasium and transformers load on use."""
