// samples/cpp/speculative.h against plain greedy decoding, on toy models whose next token is a hash of their
// whole cache: a cache the loop cut back wrongly, or a token it forgot to feed, changes every later token.
// Prints "ok <cases>" and exits 0, or names the first failing case and exits 1.
#include "speculative.h"

#include <cstdint>
#include <iostream>
#include <set>
#include <vector>

namespace
{
constexpr int64_t kVocabulary = 50;

uint64_t mix(uint64_t value)
{
    value ^= value >> 33;
    value *= 0xff51afd7ed558ccdULL;
    value ^= value >> 33;
    return value;
}

// Greedy next token = hash(cache) mod vocabulary; a draft instead proposes another token when a second hash of
// the cache falls under its error rate.
struct ToyModel
{
    std::vector<int64_t> cache;
    int errorPercent{0};
    int64_t calls{0};

    int64_t greedy() const
    {
        uint64_t state = 1469598103934665603ULL;
        for (int64_t token : cache)
            state = mix(state ^ static_cast<uint64_t>(token + 7));
        int64_t const verifier = static_cast<int64_t>(state % kVocabulary);
        if (errorPercent && static_cast<int>(mix(state + 99) % 100) < errorPercent)
            return (verifier + 1 + static_cast<int64_t>(mix(state + 5) % (kVocabulary - 1))) % kVocabulary;
        return verifier;
    }

    std::vector<int64_t> forward(std::vector<int64_t> const& tokens)
    {
        ++calls;
        std::vector<int64_t> choices;
        for (int64_t token : tokens)
        {
            cache.push_back(token);
            choices.push_back(greedy());
        }
        return choices;
    }

    int64_t length() const { return static_cast<int64_t>(cache.size()); }

    void truncate(int64_t length)
    {
        if (length > this->length())
            throw std::logic_error("truncate past the cache");
        cache.resize(length);
    }
};

std::vector<int64_t> plainGreedy(std::vector<int64_t> const& prompt, int64_t maxNew, std::set<int64_t> const& eos)
{
    ToyModel model;
    std::vector<int64_t> output{model.forward(prompt).back()};
    while (static_cast<int64_t>(output.size()) < maxNew && !eos.count(output.back()))
        output.push_back(model.forward({output.back()}).back());
    return output;
}
} // namespace

int main()
{
    int cases = 0;
    for (int promptSeed = 0; promptSeed < 24; ++promptSeed)
        for (int64_t draftTokens : {1, 2, 4, 7})
            for (int errorPercent : {0, 30, 100})
                for (bool withEos : {false, true})
                {
                    std::vector<int64_t> prompt;
                    for (int i = 0; i <= promptSeed % 9; ++i)
                        prompt.push_back(static_cast<int64_t>(mix(promptSeed * 31 + i) % kVocabulary));
                    std::set<int64_t> eos;
                    if (withEos)
                        eos = {3, 17};
                    int64_t const maxNew = 64;
                    ToyModel draft, verifier;
                    draft.errorPercent = errorPercent;
                    accullm::GoldenStats stats;
                    std::vector<int64_t> golden
                        = accullm::goldenGreedy(draft, verifier, prompt, maxNew, draftTokens, eos, &stats);
                    std::vector<int64_t> expected = plainGreedy(prompt, maxNew, eos);
                    ++cases;
                    bool ok = golden == expected && stats.accepted <= stats.proposed
                        && (errorPercent != 0 || stats.accepted == stats.proposed)
                        && (errorPercent != 100 || stats.accepted == 0)
                        && verifier.calls == stats.verifierPasses + 1;
                    // the verifier's cache holds the prompt and the output but its last token, unless an agreed
                    // proposal ended the text (then the pass that scored it holds the tokens up to it as well)
                    std::vector<int64_t> sequence = prompt;
                    sequence.insert(sequence.end(), golden.begin(), golden.end() - 1);
                    ok = ok && verifier.cache.size() >= sequence.size()
                        && std::equal(sequence.begin(), sequence.end(), verifier.cache.begin());
                    if (!ok)
                    {
                        std::cout << "FAIL prompt " << promptSeed << " draft tokens " << draftTokens << " error "
                                  << errorPercent << "% eos " << withEos << ": golden " << golden.size()
                                  << " tokens, greedy " << expected.size() << ", accepted " << stats.accepted
                                  << " of " << stats.proposed << "\n";
                        return 1;
                    }
                }
    std::cout << "ok " << cases << "\n";
    return 0;
}
